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

The threshold stored with the model was chosen on its labeled dev split. For a corpus of another kind,
--calibrate-rows N chooses it on N rows drawn at random from this input instead (one full-depth pass, no
labels; --calibration-seed to repeat a draw) so that
early-exit labels agree with the full model's on >= --min-agreement of the corpus with probability
>= 1 - --delta (a one-sided Clopper-Pearson bound on the sample; with N too small for that, full depth); a
choice that meets the target is pinned in the output folder, and every run that uses it prints its promise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


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
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    batch_size: Annotated[int, typer.Option(help="rows per model call")] = 64,
    sort_rows: Annotated[
        int, typer.Option(help="rows sorted by length together, then cut into model calls")
    ] = 512,
    actors: Annotated[
        int | None,
        typer.Option(
            help="scoring actors (one model copy each); default: as many as the cluster's CPUs (GPUs) hold, "
            "an autoscaling pool"
        ),
    ] = None,
    cpus_per_actor: Annotated[float, typer.Option(help="CPUs per actor; torch threads follow")] = 1.0,
    gpus_per_actor: Annotated[float, typer.Option(help="GPUs per actor")] = 0.0,
    tokenize: Annotated[
        str,
        typer.Option(
            help="where texts become token ids: actor (in each scoring actor), tasks (a CPU stage of Ray "
            "Data tasks before the actors, which keeps GPU actors busy), auto (tasks when actors have GPUs)"
        ),
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="what the transformer layers run in: auto (the fastest this machine has: bf16 on a GPU or a "
            "CPU with AMX-BF16 / AVX512-BF16, int8 with VNNI only, else fp32), fp32, bf16 or int8"
        ),
    ] = "auto",
    backend: Annotated[
        str,
        typer.Option(
            help="what runs them: auto (the fastest measured for the precision, installed), torch, openvino "
            "(the openvino extra) or onnxruntime (int8; the int8 extra); built layers are made once per "
            "model version into <output>/_int8 or <output>/_openvino"
        ),
    ] = "auto",
    include_probs: Annotated[bool, typer.Option(help="also write every class probability")] = False,
    output_prefix: Annotated[
        str,
        typer.Option(
            help="prefix of the output columns, e.g. pred_ to score a labeled corpus "
            "(pred_label beside label)"
        ),
    ] = "",
    calibrate_rows: Annotated[
        int,
        typer.Option(
            help="choose S (or r, t) on this many input rows, no labels needed: the fastest agreeing with "
            "full depth on "
            ">= --min-agreement of them; pinned in <output>/_calibration for later runs. 0: the model's"
        ),
    ] = 0,
    min_agreement: Annotated[
        float, typer.Option(help="agreement with full depth that --calibrate-rows keeps")
    ] = 0.99,
    delta: Annotated[
        float,
        typer.Option(
            help="--calibrate-rows keeps --min-agreement on the corpus with probability >= 1 - delta"
        ),
    ] = 0.05,
    calibration_seed: Annotated[
        int | None,
        typer.Option(help="seed of --calibrate-rows' random sample; default a fresh one, recorded"),
    ] = None,
    remove_orphans: Annotated[
        bool,
        typer.Option(help="delete the outputs whose input file no longer exists (default: kept, reported)"),
    ] = False,
    address: Annotated[
        str | None, typer.Option(help="Ray address; default $RAY_ADDRESS, else a new local Ray")
    ] = None,
    summary_file: Annotated[Path | None, typer.Option(help="also write the JSON summary here")] = None,
) -> None:
    from jobs.cli import one_line_errors
    from pipelines.config import ScoreConfig
    from pipelines.errors import UserError
    from pipelines.scoring.pipeline import run_scoring

    with one_line_errors(ValueError):  # every bad flag value is refused here, before Ray starts
        config = ScoreConfig(
            model=model,
            input=input,
            output=output,
            policy=policy,
            threshold=threshold,
            patience=patience,
            risk=risk,
            text_column=text_column,
            batch_size=batch_size,
            sort_rows=sort_rows,
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
            tokenize=tokenize,
            precision=precision,
            backend=backend,
            include_probs=include_probs,
            output_prefix=output_prefix,
            calibrate_rows=calibrate_rows,
            min_agreement=min_agreement,
            delta=delta,
            calibration_seed=calibration_seed,
            remove_orphans=remove_orphans,
        )
    with one_line_errors(UserError):
        summary = run_scoring(config, address)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if summary_file:
        summary_file.write_text(text)


if __name__ == "__main__":
    app()
