"""Early exit in every CPU runtime against the plain model in every runtime a CPU user would pick instead.

One process, the same texts, the same token ids, the same batches (rows sorted by length, --batch-size rows a
call, padded to the longest), the same threads (--threads) for every scorer; steady state (a warm-up pass,
then the best of --repeats timed passes, tokenising excluded as it is the same for all):

  plain (the fine-tuned model at full depth: encoder + final classifier, exported as a user would)
    torch-fp32           PyTorch as trained
    torch-bf16           PyTorch under torch.autocast("cpu", bfloat16) (oneDNN on AMX / AVX512-BF16)
    onnxruntime-int8     ONNX Runtime dynamic int8, per-channel weights (`quantize_dynamic`)
    openvino             OpenVINO with no settings (its CPU plugin runs bf16 where the CPU has it)
    openvino-f32         OpenVINO forced to f32 (INFERENCE_PRECISION_HINT f32)
    openvino-int8        OpenVINO after NNCF post-training quantisation (`nncf.quantize`, model_type
                         TRANSFORMER, 300 calibration rows): the sentence-transformers guide's recipe
  early exit (`ee_model.runtime`), each at the knob `jobs/score.py --calibrate-rows` chooses in that runtime
    (--calibrate-rows rows of a disjoint sample, min agreement 0.99, delta 0.05, the model's policy)
    ee-fp32, ee-bf16 (PyTorch bf16 layers), ee-bf16-openvino, ee-fp32-openvino, ee-int8 (ONNX Runtime),
    ee-int8-openvino (NNCF int8 per layer, calibrated on the 300 texts the plain model's NNCF run uses)

Texts: unseen BBC text (`common.unseen_bbc`: paragraphs and sentence passages of the dev and test
articles, with the article's label as gold), or --corpus a parquet file with a `text` column (and optionally
`gold`), e.g. a docstrings corpus. Reports rows/s, the ratio to plain
torch-fp32 and to the fastest plain scorer, label agreement with fp32 at full depth, and accuracy on gold.

--as-cpu-without-bf16 runs as on a CPU with AVX512-VNNI but no bf16 or AMX: the process re-executes
itself with ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI (PyTorch's oneDNN kernels), OpenVINO is set as it would run on
such a CPU (f32 hint: it reads the CPU's flags itself and ignores the oneDNN cap), and the bf16 scorers are
left out. A CPU without bf16 units, or capped below them (ONEDNN_MAX_CPU_ISA=AVX2), is run the same way.

    python benchmarks/cpu_runtimes.py --model /path/to/quick/model --rows 2000 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import PlainClassifier, plain_openvino, unseen_bbc

from ee_model.cpu_support import cpu_support
from ee_model.runtime_choice import cpu_candidates, measure_runtimes, pick
from pipelines.scoring.runtime_choice import MEASURE_ROWS


def export_plain_int8(model_dir: str, folder: Path) -> dict[str, Path]:
    """(d): the plain model exported whole, then int8 per-channel and per-tensor."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ee_model import EarlyExitClassifier
    from ee_model.int8 import export_onnx

    model = EarlyExitClassifier.from_pretrained(model_dir)
    model.encoder.set_attn_implementation("eager")
    plain = PlainClassifier(model).eval()
    example = model.encode(["a short text", "a somewhat longer text than the first one"])
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    fp32 = export_onnx(plain, example, folder / "plain.onnx", "logits", axes)
    paths = {"per_channel": folder / "plain.int8pc.onnx", "per_tensor": folder / "plain.int8.onnx"}
    quantize_dynamic(fp32, paths["per_channel"], weight_type=QuantType.QInt8, per_channel=True)
    quantize_dynamic(fp32, paths["per_tensor"], weight_type=QuantType.QInt8)
    return paths


CAPPED_ISA = "AVX512_CORE_VNNI"


def batches(token_ids, batch_size: int, pad_id: int) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(rows, input_ids, attention_mask) per call: rows sorted by length, each call padded to its longest."""
    order = np.argsort(-token_ids.lengths, kind="stable")
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = token_ids.take(rows).padded(pad_id)
        out.append((rows, ids, mask))
    return out


def plain_scorers(model, calls, sample, capped: bool, threads: int, scratch: Path) -> dict:
    """{name: function(input_ids, attention_mask) -> logits (numpy)} for the plain model in each runtime."""
    import openvino as ov

    plain = PlainClassifier(model).eval()

    def torch_fp32(ids, mask):
        with torch.inference_mode():
            return plain(ids, mask).numpy()

    def torch_bf16(ids, mask):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return plain(ids, mask).float().numpy()

    scorers = {"torch-fp32": torch_fp32}
    if not capped:
        scorers["torch-bf16"] = torch_bf16

    import onnxruntime as ort

    model.save_pretrained(scratch / "model")
    onnx_path = export_plain_int8(str(scratch / "model"), scratch)["per_channel"]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    scorers["onnxruntime-int8"] = lambda ids, mask: session.run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )[0]

    example = {"input_ids": calls[0][1][:2], "attention_mask": calls[0][2][:2]}
    converted, quantized = plain_openvino(model, example, sample)
    core = ov.Core()
    base = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    f32 = {**base, "INFERENCE_PRECISION_HINT": "f32"}

    def openvino(compiled):
        request = compiled.create_infer_request()
        return lambda ids, mask: np.array(request.infer([ids.numpy(), mask.numpy()])[0])

    if not capped:
        scorers["openvino"] = openvino(core.compile_model(converted, "CPU", base))
    scorers["openvino-f32"] = openvino(core.compile_model(converted, "CPU", f32))
    scorers["openvino-int8"] = openvino(core.compile_model(quantized, "CPU", f32 if capped else base))
    return scorers


def timed(score, calls, n_rows: int, repeats: int) -> tuple[float, np.ndarray]:
    """(steady rows/s: the best of `repeats` passes after a warm-up, label ids in row order)."""
    labels = np.empty(n_rows, dtype=np.int64)
    best = float("inf")
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        for rows, ids, mask in calls:
            labels[rows] = score(ids, mask).argmax(-1)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return n_rows / best, labels


def early_exit_runs(
    model_dir: str, runtimes, token_ids, calibration_texts, threads, batch_size, scratch, capped: bool
):
    """{name: (model with the runtime, calibration)} for each runtime, calibrated as the scoring job does;
    `capped`: OpenVINO int8 runs what its quantiser left in f32, as on a CPU without bf16."""
    from ee_model import EarlyExitClassifier
    from ee_model.openvino_layers import with_openvino_layers
    from ee_model.runtime import Runtime
    from ee_model.runtime_layers import build_layers, with_runtime
    from pipelines.config import S_GRID
    from pipelines.scoring.calibration import calibrate

    fp32 = EarlyExitClassifier.from_pretrained(model_dir)
    out = {}
    for name in runtimes:
        runtime = Runtime.parse(name)
        start = time.perf_counter()
        texts = calibration_texts[:300] if runtime.needs_calibration_texts else None
        folder = build_layers(fp32, runtime, scratch / f"layers-{name}", texts)
        if capped and runtime.needs_calibration_texts:
            model = with_openvino_layers(copy.deepcopy(fp32), folder, "int8", threads, hint="f32")
        else:
            model = with_runtime(copy.deepcopy(fp32), runtime, folder, threads)
        built = time.perf_counter() - start
        calibration = calibrate(model, calibration_texts, model.config.policy, 0.99, 0.05, S_GRID, batch_size)
        out[f"ee-{name}"] = (model, calibration, built)
    return out


def run(args) -> dict:
    from ee_model import EarlyExitClassifier, ExitSetting

    torch.set_num_threads(args.threads)

    # without bf16 units (this CPU's, or as capped by ONEDNN_MAX_CPU_ISA): no bf16 scorer (it would only be
    # emulated), and OpenVINO told to run f32 (its default reads the CPU's own flags, past a oneDNN cap)
    capped = args.as_cpu_without_bf16 or not cpu_support().has_bf16
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.corpus:
            table = pq.read_table(args.corpus)
        else:
            table = pq.read_table(unseen_bbc(scratch, args.rows + args.calibrate_rows))
        rng = np.random.default_rng(0)
        order = rng.permutation(table.num_rows)
        calibration_rows, rows = order[: args.calibrate_rows], order[args.calibrate_rows :][: args.rows]
        texts = [table["text"][int(i)].as_py() for i in rows]
        gold = [table["gold"][int(i)].as_py() for i in rows] if "gold" in table.column_names else None
        calibration_texts = [table["text"][int(i)].as_py() for i in calibration_rows]
        model = EarlyExitClassifier.from_pretrained(args.model)
        token_ids = model.tokenize(texts)
        calls = batches(token_ids, args.batch_size, model.text_tokenizer.pad_id)
        reference = model.predict_tokens(token_ids, setting=ExitSetting("none"), batch_size=args.batch_size)
        results = []

        def record(name, rows_per_s, label_ids, exit_layer=None, knob=None):
            row = {
                "scorer": name,
                "rows_per_s": round(rows_per_s, 1),
                "agreement": round(float(np.mean(label_ids == reference.label_id)), 4),
            }
            if gold is not None:
                labels = np.array(model.config.labels)[label_ids]
                row["accuracy"] = round(float(np.mean(labels == np.array(gold))), 4)
            if exit_layer is not None:
                row["mean_exit_layer"] = round(float(exit_layer.mean()), 3)
                row["knob"] = knob
            results.append(row)
            print(json.dumps(row), flush=True)

        sample = [  # NNCF's calibration rows, one at a time: what its guide feeds
            {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
            for _, ids, mask in batches(
                model.tokenize(calibration_texts[:300]), 1, model.text_tokenizer.pad_id
            )
        ]
        plain = plain_scorers(copy.deepcopy(model), calls, sample, capped, args.threads, scratch)
        for name, score in plain.items():
            rows_per_s, label_ids = timed(score, calls, len(texts), args.repeats)
            record(f"plain {name}", rows_per_s, label_ids)
        candidates, left_out = cpu_candidates()  # what `auto` times here (under the cap, if capped)
        runtimes = [r.name for r in candidates] + ["fp32-openvino"]  # OpenVINO f32: never auto's, compared
        for name, why in left_out.items():
            print(f"left out: ee-{name}: {why}", flush=True)
        if capped:
            print("left out: plain torch-bf16, plain openvino (its bf16 default): no bf16 units", flush=True)
        runs = early_exit_runs(
            args.model, runtimes, token_ids, calibration_texts, args.threads, args.batch_size, scratch, capped
        )
        for name, (ee, calibration, _) in runs.items():
            setting = calibration.setting

            def predict(ee=ee, setting=setting):
                return ee.predict_tokens(token_ids, setting=setting, batch_size=args.batch_size)

            predict()
            best, out = float("inf"), None
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = predict()
                best = min(best, time.perf_counter() - start)
            record(name, len(texts) / best, out.label_id, out.exit_layer, calibration.knob)
        # what `--precision auto` picks here, timed as the scoring job times it (its own sample of the
        # calibration rows, the model's stored knob, these threads and batch size; the layers built above)
        start = time.perf_counter()
        measurements = measure_runtimes(
            model,
            candidates,
            calibration_texts[:MEASURE_ROWS],
            model.config.setting(),
            lambda runtime: scratch / f"layers-{runtime.name}",
            calibration_texts[:300],
            threads=args.threads,
            batch_size=args.batch_size,
        )
        auto, auto_why = pick(measurements)
        choosing_s = round(time.perf_counter() - start, 1)
        print(f"auto picked {auto} in {choosing_s} s: {auto_why}", flush=True)
    plain = [r for r in results if r["scorer"].startswith("plain")]
    base = next(r for r in plain if r["scorer"] == "plain torch-fp32")["rows_per_s"]
    fastest = max(plain, key=lambda r: r["rows_per_s"])
    for row in results:
        row["x_torch_fp32"] = round(row["rows_per_s"] / base, 2)
        row["x_fastest_plain"] = round(row["rows_per_s"] / fastest["rows_per_s"], 2)
    early = [r for r in results if r["scorer"].startswith("ee-")]
    fastest_ee = max(early, key=lambda r: r["rows_per_s"])
    picked = next(r for r in early if r["scorer"] == f"ee-{auto}")
    for row in results:
        row["auto"] = row["scorer"] == f"ee-{auto}"
    summary = {
        "auto": auto,
        "auto_reason": auto_why,
        "choosing_s": choosing_s,
        "auto_measurements": [m.__dict__ for m in measurements],
        "left_out": left_out,
        "auto_x_fastest_early_exit": round(picked["rows_per_s"] / fastest_ee["rows_per_s"], 3),
        "auto_x_fastest_plain": picked["x_fastest_plain"],
        "threads": args.threads,
        "rows": len(texts),
        "as_cpu_without_bf16": capped,
        "fastest_plain": fastest["scorer"],
        "results": results,
    }
    print(json.dumps(summary, indent=2))
    print(
        f"\nauto: {auto} = {summary['auto_x_fastest_early_exit']}x the fastest early exit "
        f"({fastest_ee['scorer']}), {summary['auto_x_fastest_plain']}x the fastest plain; "
        f"chose in {choosing_s} s"
    )
    columns = ["scorer", "rows/s", "x torch fp32", "x fastest plain", "agreement", "accuracy", "mean exit"]
    print("\n| " + " | ".join([*columns, "knob", "auto"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [r["scorer"], r["rows_per_s"], r["x_torch_fp32"], r["x_fastest_plain"], r["agreement"]]
        cells += [r.get("accuracy", ""), r.get("mean_exit_layer", ""), r.get("knob", "")]
        cells += ["picked" if r["auto"] else ""]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a saved early-exit model directory")
    parser.add_argument("--corpus", help="parquet with a text (and gold) column; default unseen BBC text")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--calibrate-rows", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--as-cpu-without-bf16", action="store_true")
    args = parser.parse_args()
    if args.as_cpu_without_bf16 and os.environ.get("ONEDNN_MAX_CPU_ISA") != CAPPED_ISA:
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": CAPPED_ISA}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # the cap is read when oneDNN loads
    run(args)


if __name__ == "__main__":
    main()
