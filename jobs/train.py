"""Train an early-exit classifier on Ray Train, track it in MLflow, register it.

Examples:
    python jobs/train.py                                  # KL, quick profile, BBC + MiniLM-L6, local Ray
    python jobs/train.py --variant count                  # Count variant (joint training, count exit)
    python jobs/train.py --tune --set tune.num_samples=6  # Bayesian lr search (Ray Tune + Optuna) for stage 1
    python jobs/train.py --config my.yaml --num-workers 2 --set stage1.epochs=3 --set model.pooling=cls
    python jobs/train.py --train-path data/train.parquet --encoder bert-base-uncased --profile full --use-gpu
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --num-workers 2

Prints a JSON summary (accuracy, mean exit layer, speed-ups, the registered model URI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from pipelines.config import merge

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


def parse_sets(assignments: list[str]) -> dict[str, Any]:
    """["stage1.epochs=3", "model.pooling=cls"] -> {"stage1": {"epochs": 3}, "model": {"pooling": "cls"}}."""
    out: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set needs key=value, got {assignment!r}")
        out = merge(out, _nested(key, parse_value(raw)))
    return out


def parse_value(raw: str) -> Any:
    """YAML scalars, plus numbers YAML 1.1 reads as strings ("5e-3")."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@app.command()
def main(
    variant: Annotated[
        str | None,
        typer.Option(
            help="kl (two-stage; exits by the fitted risk rule, model.policy=entropy for one S) or count "
            "(joint, count exit)"
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML config file (keys of pipelines.config.TrainConfig)")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="quick (default, 2-CPU friendly) or full (the paper's)")
    ] = None,
    encoder: Annotated[
        str | None, typer.Option(help="HF model id or path; default the packaged MiniLM-L6")
    ] = None,
    train_path: Annotated[str | None, typer.Option(help="labeled parquet (file, folder, glob, URI)")] = None,
    dev_path: Annotated[str | None, typer.Option(help="dev parquet; default split from train")] = None,
    test_path: Annotated[str | None, typer.Option(help="test parquet; default split from train")] = None,
    unlabeled_path: Annotated[
        str | None, typer.Option(help="unlabeled parquet for stage 2 ('' = none)")
    ] = None,
    num_workers: Annotated[int | None, typer.Option(help="Ray Train workers")] = None,
    use_gpu: Annotated[bool | None, typer.Option("--use-gpu/--no-gpu", help="one GPU per worker")] = None,
    tune: Annotated[
        bool | None, typer.Option("--tune/--no-tune", help="Bayesian lr search of stage 1 / joint")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="any config field, e.g. stage1.epochs=3")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray address; default $RAY_ADDRESS, else a new local Ray")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="also write the JSON summary here")] = None,
) -> None:
    import os

    import ray

    from jobs.cli import one_line_errors
    from pipelines.config import load_train_config
    from pipelines.errors import UserError
    from pipelines.training.pipeline import check_inputs, run_training, summary_json

    overrides: dict[str, Any] = {}
    flat = {
        "variant": variant,
        "data.train_path": train_path,
        "data.dev_path": dev_path,
        "data.test_path": test_path,
        "data.unlabeled_path": unlabeled_path,
        "model.encoder": encoder,
        "resources.num_workers": num_workers,
        "resources.use_gpu": use_gpu,
        "tune.enabled": tune,
    }
    for key, value in flat.items():
        if value is not None:
            overrides = merge(overrides, _nested(key, value))
    overrides = merge(overrides, parse_sets(set_ or []))
    with one_line_errors(ValueError, OSError):  # every config value is checked here, before Ray starts
        train_config = load_train_config(config, overrides, profile)
    with one_line_errors(UserError):  # the data, the unlabeled corpus and the encoder, before Ray starts
        inputs = check_inputs(train_config)
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", ignore_reinit_error=True)
    with one_line_errors(UserError):
        summary = run_training(train_config, inputs)
    ray.shutdown()  # Ray Data's progress lines and the workers' last logs come out now, not after the summary
    text = summary_json(summary)
    print(text)
    if output:
        output.write_text(text)


def _nested(key: str, value: Any) -> dict[str, Any]:
    *parents, leaf = key.split(".")
    node: dict[str, Any] = {leaf: value}
    for part in reversed(parents):
        node = {part: node}
    return node


if __name__ == "__main__":
    app()
