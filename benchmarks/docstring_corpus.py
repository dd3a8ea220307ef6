"""A labeled corpus built offline from installed packages: which library does this docstring come from?

Each row is the first paragraph of a function's or class's docstring in the source of one of `PACKAGES`, read
with `ast` (nothing is imported), labeled with the package. Library and alias names (numpy, np, ...) are
masked so the text must be read, not matched. Short technical texts, 10 imbalanced classes: unlike BBC's news
articles in length, vocabulary and class count. Rows are deduplicated and capped per class, in a fixed order.

    python benchmarks/docstring_corpus.py --out data/docstrings.parquet
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PACKAGES = (
    "numpy",
    "scipy",
    "pandas",
    "torch",
    "sklearn",
    "matplotlib",
    "sympy",
    "networkx",
    "sqlalchemy",
    "pyarrow",
)
ALIASES = ("np", "sp", "pd", "plt", "mpl", "nx", "sa", "pa", "pq", "scikit-learn", "scikit_learn", "arrow")
MASK = re.compile(r"\b(" + "|".join(map(re.escape, PACKAGES + ALIASES)) + r")\b", re.IGNORECASE)
MIN_CHARS, MAX_CHARS = 40, 600


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def first_paragraphs(source: str) -> list[str]:
    """The first paragraph of every function and class docstring in `source`, whitespace collapsed."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc:
                texts.append(" ".join(doc.strip().split("\n\n")[0].split()))
    return texts


def package_texts(name: str) -> list[str]:
    seen, texts = set(), []
    for path in sorted(package_dir(name).rglob("*.py")):
        if "test" in path.parts or "tests" in path.parts or path.name.startswith("test_"):
            continue
        for text in first_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            text = MASK.sub("LIB", text)
            if MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
                seen.add(text)
                texts.append(text)
    return texts


def docstring_corpus(max_per_class: int = 800, seed: int = 0) -> pa.Table:
    """(text, label) rows: up to `max_per_class` docstrings per package, drawn with `seed`; labels are texts
    that appear under one package only."""
    per_package = {name: package_texts(name) for name in PACKAGES}
    owners: dict[str, set[str]] = {}
    for name, texts in per_package.items():
        for text in texts:
            owners.setdefault(text, set()).add(name)
    rng = random.Random(seed)
    rows = []
    for name, texts in per_package.items():
        unique = [t for t in texts if len(owners[t]) == 1]
        rows += [(t, name) for t in rng.sample(unique, min(max_per_class, len(unique)))]
    rng.shuffle(rows)
    return pa.table({"text": [t for t, _ in rows], "label": [label for _, label in rows]})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-per-class", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = docstring_corpus(args.max_per_class, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    counts = table.group_by("label").aggregate([("label", "count")]).sort_by("label").to_pylist()
    print(f"{table.num_rows} rows -> {args.out}:", {c["label"]: c["label_count"] for c in counts})


if __name__ == "__main__":
    main()
