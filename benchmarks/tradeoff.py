"""Our Table 2: accuracy and speed-ups of the early-exit variants and two baselines, trained in one run.

Trained here, on Ray Train, with the training pipeline's own stages (one MLflow parent run, a child per
stage):
- stage 1 (backbone + teacher, cross-entropy): shared by
  - KL: stage 2 self-distillation (KL to the teacher, labeled + unlabeled text), entropy exit;
  - DeeBERT-style: stage 2 with cross-entropy to gold labels (labeled text only), entropy exit;
- joint training of every exit with cross-entropy, twice, differing only in the loss weights:
  - Count: uniform weights, count exit (Algorithm 2);
  - PABEE-style: layer-index weights, patience exit (consecutive agreement).

Reported on the test split: the full model; KL at S = 0.1, 0.5, 0.8 and the automatic S (>= 99% of full dev
accuracy); Count at t = 2..5 (and its automatic t); DeeBERT-style at its automatic S; PABEE-style at t = 2..5;
the oracle of the KL and Count models. Columns: accuracy, macro-F1, retention, mean exit layer, layer / FLOPs
/ measured wall-clock (batch 1 and 64, vs the same model at full depth, same process) speed-ups.

    python benchmarks/tradeoff.py                     # quick profile (2 CPU cores: about half an hour)
    python benchmarks/tradeoff.py --profile full      # the paper's settings (GPU)

Writes benchmarks/results/tradeoff.{json,md,png} and logs them to the MLflow parent run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
TIMED_BATCH_SIZES = (1, 64)


def model_rows(
    name: str, model, dev, test, settings, auto_rule: str | None, eval_config, wallclock_rows: int
):
    """Table rows of one trained model: each (rule, knob) setting, the auto knob, the oracle."""
    from ee_model import ExitSetting
    from pipelines.evaluation.passes import full_pass
    from pipelines.evaluation.sweep import evaluate_split, oracle_point, policy_point
    from pipelines.evaluation.thresholds import choose_knob
    from pipelines.evaluation.wallclock import wallclock_speedups

    dev_pass, test_pass = full_pass(model, dev), full_pass(model, test)
    chosen = None
    if auto_rule is not None:
        chosen = choose_knob(
            evaluate_split(model, dev, eval_config.thresholds, split=dev_pass).sweep,
            auto_rule,
            eval_config.target_spec(),
        )
        settings = [*settings, (auto_rule, chosen.point.knob, "auto")]
    points = [(policy_point(model, test_pass, ExitSetting(rule, knob)), tag) for rule, knob, tag in settings]
    texts = test["text"].to_pylist()[:wallclock_rows]
    timed = wallclock_speedups(model, texts, [p.setting for p, _ in points], TIMED_BATCH_SIZES)
    rows = []
    for point, tag in points:
        row = {"model": name, "setting": tag, **point.to_dict()}
        for w in timed:
            if (w.policy, w.knob) == (point.policy, point.knob):
                row[f"wallclock_speedup_b{w.batch_size}"] = w.wallclock_speedup
        rows.append(row)
    oracle = oracle_point(model, test_pass)
    rows.append({"model": name, "setting": "oracle", **oracle.to_dict()})
    return rows, chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--wallclock-rows", type=int, default=256, help="test rows timed per setting")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "tradeoff"))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as in jobs/train.py (e.g. model.encoder=/path)",
    )
    args = parser.parse_args()

    import mlflow
    import pandas as pd
    import ray

    from ee_model import EarlyExitClassifier
    from pipelines.config import load_train_config, merge, resolve_tracking_uri
    from pipelines.data import load_labeled_splits
    from pipelines.evaluation.report import COLUMNS
    from pipelines.tracking import setup_tracking
    from pipelines.training.pipeline import local_model_dir, run_stage, training_encoder

    started = time.time()
    from jobs.train import parse_sets

    overrides = parse_sets(args.set)
    if args.num_workers is not None:
        overrides = merge(overrides, {"resources": {"num_workers": args.num_workers}})
    kl = load_train_config(profile=args.profile, overrides=overrides)
    config_of = {
        "kl": kl,
        # DeeBERT: students trained on gold labels only (no distillation, no unlabeled text)
        "deebert": load_train_config(
            profile=args.profile,
            overrides=merge(
                overrides,
                {"stage2": {"kl_weight": 0.0, "gold_weight": 1.0}, "data": {"max_unlabeled_rows": 0}},
            ),
        ),
        "count": load_train_config(profile=args.profile, overrides=merge(overrides, {"variant": "count"})),
        "pabee": load_train_config(
            profile=args.profile,
            overrides=merge(overrides, {"variant": "count", "joint": {"joint_weighting": "layer_index"}}),
        ),
    }
    splits = load_labeled_splits(kl.data)
    encoder = training_encoder(kl)
    tracking_uri = resolve_tracking_uri(kl.tracking)
    setup_tracking(tracking_uri, "early-exit-tradeoff")
    ray.init(ignore_reinit_error=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        mlflow.start_run(run_name=f"tradeoff-{args.profile}") as parent,
        tempfile.TemporaryDirectory() as scratch,
    ):
        run = parent.info.run_id
        timings = {}

        def stage(name, stage_name, config, init=None):
            t0 = time.time()
            checkpoint = run_stage(
                stage_name, config, splits, encoder, init, run, tracking_uri, run_name=name
            )
            timings[name] = round(time.time() - t0, 1)
            return checkpoint

        stage1 = stage("stage1", "stage1", kl)
        checkpoints = {
            "kl": stage("stage2-kl", "stage2", kl, stage1),
            "deebert": stage("stage2-deebert", "stage2", config_of["deebert"], stage1),
            "count": stage("joint-count", "joint", config_of["count"]),
            "pabee": stage("joint-pabee", "joint", config_of["pabee"]),
        }
        models = {
            name: EarlyExitClassifier.from_pretrained(local_model_dir(ckpt, Path(scratch) / name))
            for name, ckpt in checkpoints.items()
        }
        t = range(2, min(6, models["count"].n_layers))
        plan = {
            "kl": (
                [("none", None, "full model"), *[("entropy", s, f"S={s}") for s in (0.1, 0.5, 0.8)]],
                "entropy",
            ),
            "deebert": ([], "entropy"),
            "count": ([("none", None, "full model"), *[("count", k, f"t={k}") for k in t]], "count"),
            "pabee": ([*[("patience", k, f"t={k}") for k in t]], "patience"),
        }
        rows, chosen = [], {}
        for name, (settings, rule) in plan.items():
            model_rows_, chosen[name] = model_rows(
                name, models[name], splits.dev, splits.test, settings, rule, kl.eval, args.wallclock_rows
            )
            rows += [
                r for r in model_rows_ if not (r["setting"] == "oracle" and name in ("deebert", "pabee"))
            ]
        table = pd.DataFrame(rows)
        timed = [f"wallclock_speedup_b{b}" for b in TIMED_BATCH_SIZES if f"wallclock_speedup_b{b}" in table]
        columns = ["model", "setting", *COLUMNS, *timed]  # none timed with --wallclock-rows 0
        table = table[columns]
        kl_auto = table[(table.model == "kl") & (table.setting == "auto")].iloc[0]
        kl_oracle = table[(table.model == "kl") & (table.setting == "oracle")].iloc[0]
        target = {
            "auto_S": float(kl_auto.knob),
            "auto_retention_test": float(kl_auto.retention),
            "auto_layer_speedup": float(kl_auto.layer_speedup),
            "oracle_layer_speedup": float(kl_oracle.layer_speedup),
            "share_of_oracle": float(kl_auto.layer_speedup / kl_oracle.layer_speedup),
        }
        target["met"] = target["share_of_oracle"] >= 0.8 and target["auto_retention_test"] >= 0.99
        result = {
            "command": " ".join(["python", "benchmarks/tradeoff.py", *sys.argv[1:]]),
            "profile": args.profile,
            "train_rows": splits.train.num_rows,
            "test_rows": splits.test.num_rows,
            "stage_seconds": timings,
            "seconds": round(time.time() - started, 1),
            "chosen_on_dev": {k: v.to_dict() for k, v in chosen.items() if v},
            "target": target,
            "mlflow_run_id": run,
            "rows": table.to_dict(orient="records"),
        }
        markdown = table.to_markdown(index=False, floatfmt=".3f")
        figure = plot(table)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
        out.with_suffix(".md").write_text(markdown + "\n")
        figure.savefig(out.with_suffix(".png"), dpi=120)
        mlflow.log_dict(result, "tradeoff.json")
        mlflow.log_text(markdown, "tradeoff.md")
        mlflow.log_figure(figure, "tradeoff.png")
    print(markdown)
    print(
        json.dumps(
            {k: result[k] for k in ("target", "stage_seconds", "seconds", "chosen_on_dev")},
            indent=2,
            default=str,
        )
    )


def plot(table):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.6))
    axes = figure.subplots()
    for name, marker in (("kl", "o"), ("deebert", "v"), ("count", "s"), ("pabee", "^")):
        part = table[(table.model == name) & (table.setting != "oracle") & (table.policy != "none")]
        part = part.sort_values("layer_speedup")
        if len(part):
            axes.plot(part.layer_speedup, part.accuracy, marker=marker, label=name)
    for name in ("kl", "count"):
        oracle = table[(table.model == name) & (table.setting == "oracle")]
        axes.scatter(
            oracle.layer_speedup, oracle.accuracy, marker="*", s=150, label=f"{name} oracle", zorder=3
        )
    full = table[(table.model == "kl") & (table.setting == "full model")]
    axes.scatter(full.layer_speedup, full.accuracy, marker="D", color="grey", label="full model", zorder=3)
    axes.set_xlabel("layer speed-up")
    axes.set_ylabel("test accuracy")
    axes.set_title("BBC News, MiniLM-L6: accuracy vs speed-up")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
