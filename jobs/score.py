"""Score parquet corpora with an early-exit model on a Ray Data actor pool; incremental and kill-safe.

Examples:
    python jobs/score.py --model models:/early-exit-classifier@champion --input corpus/ --output scored/
    python jobs/score.py --model ./my-model --input 'data/*.parquet' --output scored/ --threshold 0.3 \
        --actors 2
    python jobs/score.py --model models:/early-exit-classifier/3 --input corpus/ --output scored/ \
        --policy none
    python jobs/score.py --model models:/ee@champion --input corpus/ --output scored/ --calibrate-rows 2000
    python jobs/score.py --model models:/ee@champion --input corpus/ --output scored/ --precision int8 \
        --calibrate-rows 2000
    ray job submit --working-dir . -- python jobs/score.py --model models:/ee@champion --input s/ --output o/

Run it again on the same folder (cron, Airflow, a Ray job schedule): files already scored for this model
version, policy, threshold and output columns are skipped (answered from the output's manifest, without
starting Ray), new files are scored, and a file keeps the output it was first scored into whatever folder or
glob names it later; outputs whose input file is gone are reported (--remove-orphans deletes them). Prints a
JSON summary.

The knob stored with the model was certified by its training run on that run's rows (the model says which:
the summary's `promise`). By default (--calibrate-rows auto) an input of >= 20,000 rows has it chosen on
itself instead: on 5% of its rows drawn at random (at most 4,000; --calibrate-rows N for N of them,
--calibration-seed to repeat a draw), one full-depth pass, no labels, so that early-exit labels agree with
the full model's on >= --min-agreement of the corpus with probability >= 1 - --delta (a one-sided
Clopper-Pearson bound on the sample; with too few rows for that, full depth). A smaller input, or a sample
smaller than the rows the stored knob was certified on, keeps the stored knob (--calibrate-rows 0 always
does). The choice is pinned in the output folder for its later runs, and the summary's `promise` says which
rows it stands on.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from pipelines.scoring.config import EXIT_FLAGS, ScoreConfig, score_defaults

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


DEFAULTS = score_defaults()  # declared once, in ScoreConfig; the help shows them from there


def default(name: str) -> str:
    """The help's "[default: ...]" of a flag, from ScoreConfig."""
    value = DEFAULTS[name]
    return '""' if value == "" else str(value)


@app.command()
def main(
    model: Annotated[
        str, typer.Option(help="models:/name@alias, models:/name/version, MLflow URI, or model dir")
    ],
    input: Annotated[str, typer.Option(help="parquet file, folder or glob")],  # noqa: A002
    output: Annotated[str, typer.Option(help="output folder")],
    policy: Annotated[
        str | None, typer.Option(help="entropy, risk, count, patience or none; default the model's")
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="S for entropy; default the model's")] = None,
    patience: Annotated[int | None, typer.Option(help="t for count/patience; default the model's")] = None,
    risk: Annotated[
        float | None, typer.Option(help="r for risk (risk of a changed prediction); default the model's")
    ] = None,
    text_column: Annotated[
        str | None, typer.Option(help="column holding the text", show_default=default("text_column"))
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="rows per model call", show_default=default("batch_size"))
    ] = None,
    sort_rows: Annotated[
        int | None,
        typer.Option(
            help="rows sorted by length together, then cut into model calls",
            show_default=default("sort_rows"),
        ),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            help="scoring actors (one model copy each); default: as many as the cluster's CPUs (GPUs) hold, "
            "an autoscaling pool"
        ),
    ] = None,
    cpus_per_actor: Annotated[
        float | None,
        typer.Option(help="CPUs per actor; torch threads follow", show_default=default("cpus_per_actor")),
    ] = None,
    gpus_per_actor: Annotated[
        float | None, typer.Option(help="GPUs per actor", show_default=default("gpus_per_actor"))
    ] = None,
    tokenize: Annotated[
        str | None,
        typer.Option(
            help="where texts become token ids: actor (in each scoring actor), tasks (a CPU stage of Ray "
            "Data tasks before the actors, which keeps GPU actors busy), auto (tasks when actors have GPUs)",
            show_default=default("tokenize"),
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="what the transformer layers run in: auto (the fastest this machine has: bf16 on a GPU, "
            "int8 on a CPU with VNNI, bf16 with bf16 units only, else fp32), fp32, bf16 or int8",
            show_default=default("precision"),
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="what runs them: auto (the fastest measured for the precision, installed), torch, openvino "
            "(the openvino extra; int8 there is NNCF's, calibrated on 300 input rows) or onnxruntime (int8; "
            "the int8 extra); built layers are made once per model version into <output>/_int8, "
            "<output>/_openvino or <output>/_openvino-int8",
            show_default=default("backend"),
        ),
    ] = None,
    choose_runtime: Annotated[
        str | None,
        typer.Option(
            help="how --precision auto chooses on CPU actors: measure (time the runtimes this CPU runs on "
            "256 input rows, keep the fastest agreeing >= 99 % with fp32), auto (measure on inputs of "
            ">= 50,000 rows, else the CPU-flag table), table; pinned in <output>/_runtime",
            show_default=default("choose_runtime"),
        ),
    ] = None,
    include_probs: Annotated[
        bool | None,
        typer.Option(help="also write every class probability", show_default=default("include_probs")),
    ] = None,
    output_prefix: Annotated[
        str | None,
        typer.Option(
            help="prefix of the output columns, e.g. pred_ to score a labeled corpus "
            "(pred_label beside label)",
            show_default=default("output_prefix"),
        ),
    ] = None,
    calibrate_rows: Annotated[
        str | None,
        typer.Option(
            help="choose S (or r, t) on this many input rows, no labels needed: the fastest agreeing with "
            "full depth on >= --min-agreement of them; pinned in <output>/_calibration for later runs. "
            "auto: on 5% of an input of >= 20,000 rows (at most 4,000), else the model's; 0: the model's",
            show_default=default("calibrate_rows"),
        ),
    ] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(
            help="agreement with full depth that --calibrate-rows keeps",
            show_default=default("min_agreement"),
        ),
    ] = None,
    delta: Annotated[
        float | None,
        typer.Option(
            help="--calibrate-rows keeps --min-agreement on the corpus with probability >= 1 - delta",
            show_default=default("delta"),
        ),
    ] = None,
    calibration_seed: Annotated[
        int | None,
        typer.Option(help="seed of --calibrate-rows' random sample; default a fresh one, recorded"),
    ] = None,
    remove_orphans: Annotated[
        bool | None,
        typer.Option(
            help="delete the outputs whose input file no longer exists (else kept and reported)",
            show_default=default("remove_orphans"),
        ),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray address; default $RAY_ADDRESS, else a new local Ray")
    ] = None,
    summary_file: Annotated[Path | None, typer.Option(help="also write the JSON summary here")] = None,
) -> None:
    from jobs.cli import one_line_errors
    from pipelines.errors import IncompleteRun, UserError
    from pipelines.scoring.pipeline import run_scoring

    flags = dict(locals())
    names = [f.name for f in fields(ScoreConfig) if f.name != "exit"] + list(EXIT_FLAGS)
    given = {name: flags[name] for name in names if flags.get(name) is not None}
    with one_line_errors(ValueError):  # every bad flag value is refused here, before Ray starts
        config = ScoreConfig.from_flags(**given)
    incomplete = None
    with one_line_errors(UserError):
        try:
            summary = run_scoring(config, address).to_dict()
        except IncompleteRun as error:  # started, committed what it could: its summary too, then the line
            summary, incomplete = error.summary, error
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if summary_file:
        summary_file.write_text(text)
    if incomplete is not None:
        typer.echo(f"error: {incomplete}", err=True)
        raise typer.Exit(incomplete.exit_code)


if __name__ == "__main__":
    app()
