"""The accuracy / speed-up trade-off as a table, plots and MLflow records.

`trade_off_table` turns an evaluation (`pipelines.evaluation.sweep.evaluate_split`) plus optional wall-clock
rows into one DataFrame; `trade_off_figure` plots accuracy against layer speed-up for every rule with the
oracle and the full model; `exit_histogram_figure` shows where rows leave; `log_trade_off` puts all of it in
the active MLflow run. Figures are plain `matplotlib.figure.Figure` objects (no pyplot state, works headless).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ee_model.policies import EXIT_RULES, KNOB_OF_POLICY
from pipelines.evaluation.results import SplitEvaluation, SweepPoint, WallclockTiming

KNOB_SYMBOL = {"threshold": "S", "risk": "r", "patience": "t"}

COLUMNS = [
    "policy",
    "knob",
    "accuracy",
    "macro_f1",
    "retention",
    "mean_exit_layer",
    "layer_speedup",
    "flops_speedup",
]
SWEEP_METRICS = tuple(COLUMNS[1:])  # every column but the policy, logged per sweep step


def trade_off_table(evaluation: SplitEvaluation, wallclock: Sequence[WallclockTiming] = ()) -> pd.DataFrame:
    """Full model, oracle, then every sweep point; wall-clock speed-ups joined where measured."""
    rows = [evaluation.full_model, evaluation.oracle, *evaluation.sweep]
    table = pd.DataFrame([p.to_dict() for p in rows])[COLUMNS]
    table["knob"] = table["knob"].astype(object)
    for batch_size in sorted({w.batch_size for w in wallclock}):
        column = f"wallclock_speedup_b{batch_size}"
        table[column] = np.nan
        for w in wallclock:
            if w.batch_size == batch_size:
                hit = (table["policy"] == w.policy) & (table["knob"] == w.knob)
                if not hit.any():
                    raise ValueError(f"timed point {w.policy}={w.knob} is not on the sweep grid")
                table.loc[hit, column] = w.wallclock_speedup
    return table


def markdown_table(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".3f")


def trade_off_figure(evaluation: SplitEvaluation, title: str, chosen: SweepPoint | None = None) -> Figure:
    """Accuracy vs layer speed-up: one line per rule, the oracle, the full model, the chosen setting."""
    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.subplots()
    for rule, marker in zip(EXIT_RULES, ("o", "D", "s", "^"), strict=True):
        points = sorted(evaluation.points(rule), key=lambda p: p.layer_speedup)
        if points:
            axes.plot(
                [p.layer_speedup for p in points],
                [p.accuracy for p in points],
                marker=marker,
                markersize=3,
                label=f"{rule} ({KNOB_SYMBOL[KNOB_OF_POLICY[rule]]})",
            )
    oracle, full = evaluation.oracle, evaluation.full_model
    axes.scatter(
        [oracle.layer_speedup],
        [oracle.accuracy],
        marker="*",
        s=160,
        color="black",
        label="oracle",
        zorder=3,
    )
    axes.scatter(
        [full.layer_speedup],
        [full.accuracy],
        marker="D",
        s=50,
        color="grey",
        label="full model",
        zorder=3,
    )
    if chosen is not None:
        axes.scatter(
            [chosen.layer_speedup],
            [chosen.accuracy],
            marker="o",
            s=140,
            facecolors="none",
            edgecolors="red",
            linewidths=2,
            label=f"chosen {chosen.policy}={chosen.knob}",
            zorder=4,
        )
    axes.set_xlabel("layer speed-up (L / mean exit layer)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    return figure


def exit_histogram_figure(exit_layers: np.ndarray, n_layers: int, title: str) -> Figure:
    figure = Figure(figsize=(5.0, 3.4))
    axes = figure.subplots()
    counts = np.bincount(np.asarray(exit_layers, dtype=np.int64), minlength=n_layers + 1)[1:]
    axes.bar(np.arange(1, n_layers + 1), counts)
    axes.set_xticks(np.arange(1, n_layers + 1))
    axes.set_xlabel("exit layer")
    axes.set_ylabel("rows")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def log_sweep_metrics(name: str, evaluation: SplitEvaluation) -> None:
    """One metric series per rule and quantity; step i is the rule's i-th grid point (`..._knob` at step i
    says which)."""
    for rule in EXIT_RULES:
        points = evaluation.points(rule)
        for step, point in enumerate(points):
            mlflow.log_metrics(
                {f"{name}_sweep_{rule}_{key}": float(getattr(point, key)) for key in SWEEP_METRICS}, step=step
            )
    for which in ("oracle", "full_model"):
        point = getattr(evaluation, which)
        mlflow.log_metrics(
            {f"{name}_{which}_{key}": float(getattr(point, key)) for key in SWEEP_METRICS if key != "knob"}
        )


def log_trade_off(
    name: str, evaluation: SplitEvaluation, table: pd.DataFrame, figures: dict[str, Figure]
) -> None:
    """Sweep metrics, the table (CSV + markdown) under trade_off/, figures under plots/."""
    log_sweep_metrics(name, evaluation)
    mlflow.log_text(table.to_csv(index=False), f"trade_off/{name}_sweep.csv")
    mlflow.log_text(markdown_table(table), f"trade_off/{name}_sweep.md")
    for file_name, figure in figures.items():
        mlflow.log_figure(figure, f"plots/{file_name}")
