"""The rows the training job certifies its automatic knob on: unlabeled text like the text to be scored, that
trains no student and fits no exit risk (issue 40, part 1).

The promise is label-free agreement with full depth (`pipelines.evaluation.agreement.certified_setting`, the
rule the scoring job's calibration uses too); the labeled dev split is reported beside it as a check. Which
rows:
- the default corpus (BBC): every distinct paragraph and sentence passage of the **dev** articles. Stage 1
  trains on the training articles only, so these are text the backbone never saw (the training articles'
  paragraphs, stage 2's corpus, are not: full depth is more confident on them than on new text);
- a corpus of one's own: the dev split's texts without their labels (stage 1 trains on none of them, stage 2
  and the exit risk's fit exclude them), and with an unlabeled corpus also a seeded uniform random slice of
  it, held out of stage 2 (the text-key exclusion stage 2 already applies to dev and test texts,
  `eval_overlap.eval_text_keys`). Dev's few hundred rows alone certify a looser bound than thousands (on the
  SpamAssassin corpus, 354 held-out rows certified 2.97x where 800 rows reach 4.37x: docs/results.md), so
  both are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.bbc import sentence_passages, split_paragraphs
from pipelines.config import TrainConfig
from pipelines.data import DataError, LabeledSplits, parquet_dataset, unlabeled_path
from pipelines.row_sample import sample_texts
from pipelines.training.eval_overlap import text_key


@dataclass(frozen=True)
class CertificationRows:
    texts: tuple[str, ...]
    source: str  # which rows, and why they stand for unseen text


def article_pieces(articles: list[str]) -> list[str]:
    """Every distinct paragraph and sentence passage of `articles`, in order."""
    pieces: dict[str, None] = {}
    for text in articles:
        one = pa.table({"doc_id": [0], "text": [text]})
        for piece in split_paragraphs(one)["text"].to_pylist() + sentence_passages([text]):
            pieces.setdefault(piece)
    return list(pieces)


def default_corpus_rows(splits: LabeledSplits, rows: int, seed: int) -> CertificationRows:
    """Up to `rows` of the dev articles' paragraphs and passages, drawn uniformly with `seed`."""
    others = [*splits.train["text"].to_pylist(), *splits.test["text"].to_pylist()]
    seen = {
        text_key(t) for t in (*others, *article_pieces(others))
    }  # a piece of another article is seen text
    pieces = [p for p in article_pieces(splits.dev["text"].to_pylist()) if text_key(p) not in seen]
    chosen = np.sort(np.random.default_rng(seed).permutation(len(pieces))[:rows])
    return CertificationRows(
        tuple(pieces[i] for i in chosen),
        f"{len(chosen)} paragraphs and sentence passages of the {splits.dev.num_rows} dev articles, drawn at "
        f"random (seed {seed}): stage 1 trained on none of them",
    )


HELD_OUT_SHARE = 0.2  # at most this share of an unlabeled corpus is held out of stage 2 for certification


def corpus_rows(config: TrainConfig, splits: LabeledSplits, rows: int) -> CertificationRows | None:
    """Up to `rows` rows, and at most `HELD_OUT_SHARE` of the corpus, drawn uniformly (seed `config.seed`)
    from all of the unlabeled corpus (past `data.max_unlabeled_rows` too: those rows train nothing anyway),
    texts equal to a labeled one left out; None without an unlabeled corpus."""
    path = unlabeled_path(config.data, splits)
    if path is None:
        return None
    column = config.data.unlabeled_text_column or config.data.text_column
    dataset = parquet_dataset(path)
    try:
        files = [(f.path, f.count_rows()) for f in dataset.get_fragments()]
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"cannot read the unlabeled corpus {path!r}: {error}") from error
    total = sum(n for _, n in files)
    wanted = min(rows, int(total * HELD_OUT_SHARE))
    if wanted == 0:
        return None
    labeled = {
        text_key(t) for table in (splits.train, splits.dev, splits.test) for t in table["text"].to_pylist()
    }
    drawn = sample_texts(files, column, wanted, config.seed)
    texts = tuple(dict.fromkeys(t for t in drawn if text_key(t) not in labeled))  # distinct, none labeled
    return CertificationRows(
        texts,
        f"{len(texts)} rows drawn at random (seed {config.seed}) from the unlabeled corpus's {total:,}, held "
        "out of stage 2 (which trains on the rest) and of the exit risk's fit",
    )


def dev_rows(splits: LabeledSplits) -> CertificationRows:
    """The dev split's distinct texts that no training or test text equals, without their labels."""
    seen = {text_key(t) for table in (splits.train, splits.test) for t in table["text"].to_pylist()}
    texts = tuple(dict.fromkeys(t for t in splits.dev["text"].to_pylist() if text_key(t) not in seen))
    return CertificationRows(
        texts, f"the {len(texts)} dev texts, without their labels (stage 1 trained on none of them)"
    )


def certification_rows(config: TrainConfig, splits: LabeledSplits) -> CertificationRows | None:
    """The rows the automatic knob is certified on (module doc); None: certify on dev's labels
    (`eval.certify_rows` 0)."""
    rows = config.eval.certify_rows
    if not rows or not config.eval.auto_threshold or config.eval.target != "retention":
        return None
    if config.data.train_path is None:
        return default_corpus_rows(splits, rows, config.seed)
    dev, held = dev_rows(splits), corpus_rows(config, splits, rows)
    if held is None:
        return dev if dev.texts else None
    keys = {text_key(t) for t in held.texts}
    return CertificationRows(
        (*held.texts, *(t for t in dev.texts if text_key(t) not in keys)), f"{held.source}; and {dev.source}"
    )
