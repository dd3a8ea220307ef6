"""A labeled corpus built offline from installed packages: which library does this docstring come from?

Each row is the first paragraph of a function's or class's docstring in the source of one of `PACKAGES`, read
with `ast` (nothing is imported), labeled with the package. Library and alias names (numpy, np, ...) are
masked so the text must be read, not matched. Short technical texts, 10 imbalanced classes: unlike BBC's news
articles in length, vocabulary and class count. Rows are deduplicated and capped per class, in a fixed order.

`--by subpackage`: the whole docstring (up to 1,500 characters: summary, parameters, notes) of functions and
classes in the sub-packages of `SUBPACKAGE_OWNERS` (scipy.stats, sklearn.linear_model, sympy.polys, ...),
labeled with the sub-package; sub-packages with fewer than `MIN_PER_SUBPACKAGE` distinct docstrings are left
out. Longer texts and more classes (a topic task inside one field) than the first corpus. Only the library
names are masked: a docstring that names its own sub-package (`LIB.stats`) keeps that clue, as a news article
keeps its topic's words.

    python benchmarks/docstring_corpus.py --out data/docstrings.parquet
    python benchmarks/docstring_corpus.py --by subpackage --max-per-class 300 --out data/subpackages.parquet
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
SUBPACKAGE_OWNERS = ("scipy", "sklearn", "sympy")
SUBPACKAGE_MAX_CHARS = 1500
MIN_PER_SUBPACKAGE = 150


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def docstrings(source: str, whole: bool = False) -> list[str]:
    """The first paragraph (or, `whole`, all) of every function and class docstring in `source`, whitespace
    collapsed."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc:
                texts.append(" ".join((doc if whole else doc.strip().split("\n\n")[0]).split()))
    return texts


def directory_texts(directory: Path, whole: bool = False, max_chars: int = MAX_CHARS) -> list[str]:
    """Distinct masked docstrings of the non-test modules under `directory`, `MIN_CHARS` to `max_chars`
    long (longer whole docstrings are cut at `max_chars`)."""
    seen, texts = set(), []
    for path in sorted(directory.rglob("*.py")):
        if "test" in path.parts or "tests" in path.parts or path.name.startswith("test_"):
            continue
        for text in docstrings(path.read_text(encoding="utf-8", errors="replace"), whole):
            text = MASK.sub("LIB", text)
            text = text[:max_chars] if whole else text
            if MIN_CHARS <= len(text) <= max_chars and text not in seen:
                seen.add(text)
                texts.append(text)
    return texts


def subpackage_texts() -> dict[str, list[str]]:
    """{"scipy.stats": whole docstrings, ...} for every public sub-package of `SUBPACKAGE_OWNERS`."""
    texts = {}
    for owner in SUBPACKAGE_OWNERS:
        for directory in sorted(package_dir(owner).iterdir()):
            public = not directory.name.startswith("_") and "test" not in directory.name
            if public and (directory / "__init__.py").is_file():
                found = directory_texts(directory, whole=True, max_chars=SUBPACKAGE_MAX_CHARS)
                if len(found) >= MIN_PER_SUBPACKAGE:
                    texts[f"{owner}.{directory.name}"] = found
    return texts


def docstring_corpus(max_per_class: int = 800, seed: int = 0, by: str = "package") -> pa.Table:
    """(text, label) rows: up to `max_per_class` docstrings per class (package, or sub-package with
    `by="subpackage"`), drawn with `seed`; only texts that appear under one class."""
    if by == "subpackage":
        per_package = subpackage_texts()
    else:
        per_package = {name: directory_texts(package_dir(name)) for name in PACKAGES}
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
    parser.add_argument("--by", choices=("package", "subpackage"), default="package")
    args = parser.parse_args()
    table = docstring_corpus(args.max_per_class, args.seed, args.by)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    counts = table.group_by("label").aggregate([("label", "count")]).sort_by("label").to_pylist()
    print(f"{table.num_rows} rows -> {args.out}:", {c["label"]: c["label_count"] for c in counts})


if __name__ == "__main__":
    main()
