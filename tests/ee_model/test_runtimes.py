"""Runtimes of the transformer layers (ee_model.runtime): the `auto` choice for given CPU flags, bf16 in
PyTorch and OpenVINO layers against fp32 per family, and refusals.

Models are trained briefly on the tiny separable task (as for int8): untrained heads give near-uniform outputs
whose labels would agree or not by chance. The bound on each layer's pooled hidden state catches an ignored
padding mask (with the mask ignored the error is 81-188 %, tests/ee_model/test_int8.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ee_model import encoders
from ee_model.cpu_support import cpu_support
from ee_model.runtime import BF16, FP32, Runtime, resolve_runtime
from ee_model.runtime_layers import build_layers, with_runtime
from tests.conftest import (
    FAMILIES,
    NEWER_FAMILIES,
    labeled_table,
    needs_bf16_units,
    pooled_error,
    random_texts,
    trained_tiny,
)

MIN_LABEL_AGREEMENT = 0.99
MIN_EXIT_LAYER_AGREEMENT = 0.98
MAX_HIDDEN_ERROR = 0.1  # relative L2 of a layer's pooled hidden state

AMX = frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"})
VNNI_ONLY = frozenset({"avx512f", "avx512_vnni"})
ZEN4 = frozenset({"avx512f", "avx512_vnni", "avx512_bf16"})  # AVX512-BF16 and VNNI, no AMX (also Cooper Lake)
BF16_ONLY = frozenset({"avx512f", "avx512_bf16"})  # no such CPU is sold; the rule still holds
OLD = frozenset({"avx2", "fma"})


@pytest.mark.parametrize(
    "flags, cap, gpu, expected, why",
    [
        (AMX, None, False, "int8", "int8 dot products and bf16 (CPU flags: amx_bf16, avx512_bf16"),
        (AMX, "AVX512_CORE_VNNI", False, "int8", "int8 dot products but no bf16"),
        (ZEN4, None, False, "int8", "int8 dot products and bf16 (CPU flags: avx512_bf16, avx512_vnni"),
        (AMX, "AVX512_CORE_BF16", False, "int8", "int8 dot products and bf16"),
        (VNNI_ONLY, None, False, "int8", "int8 dot products but no bf16 (CPU flags: avx512_vnni)"),
        (BF16_ONLY, None, False, "bf16", "bf16 but no int8 dot products (CPU flags: avx512_bf16)"),
        (OLD, None, False, "fp32", "neither bf16 nor VNNI"),
        (AMX, "AVX2", False, "fp32", "ONEDNN_MAX_CPU_ISA=AVX2"),
        (OLD, None, True, "bf16", "a GPU"),
    ],
)
def test_auto_picks_the_fastest_precision_for_the_cpus_flags(flags, cap, gpu, expected, why):
    runtime, reason = resolve_runtime("auto", "auto", gpu=gpu, support=cpu_support(flags, cap or ""))
    assert runtime.precision == expected and why in reason
    fastest_installed = {"fp32": "torch", "bf16": "openvino", "int8": "openvino"}  # the extras installed
    assert runtime.backend == ("torch" if gpu else fastest_installed[expected])


def test_runtimes_a_machine_cannot_run_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"precision 'bf16' needs a CPU with AMX-BF16 or AVX512-BF16") as e:
        resolve_runtime("bf16", support=cpu_support(VNNI_ONLY, ""))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="runs on CPUs"):
        resolve_runtime("int8", gpu=True)
    with pytest.raises(ValueError, match="backend 'openvino' runs on CPUs"):
        resolve_runtime("bf16", "openvino", gpu=True)
    with pytest.raises(ValueError, match="backend 'torch' does not run int8"):
        resolve_runtime("int8", "torch", support=cpu_support(AMX, ""))
    with pytest.raises(ValueError, match="is not one of"):
        resolve_runtime("int4")


def test_a_missing_backend_is_named_with_its_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name)
    )
    with pytest.raises(ValueError, match=r"backend openvino needs openvino: pip install .*\[openvino\]"):
        resolve_runtime("bf16", "openvino", support=cpu_support(AMX, ""))
    runtime, _ = resolve_runtime("bf16", "auto", support=cpu_support(AMX, ""))
    assert runtime == BF16  # auto takes the fastest backend that is installed


def test_auto_without_the_int8_backends_falls_back_to_fp32(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in ("onnxruntime", "openvino") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    runtime, why = resolve_runtime("auto", support=cpu_support(VNNI_ONLY, ""))
    assert runtime == FP32 and "needs onnxruntime" in why and "; so fp32;" in why
    runtime, why = resolve_runtime("auto", support=cpu_support(ZEN4, ""))  # bf16 on torch runs without them
    assert runtime == BF16 and "not int8-openvino: backend openvino needs openvino" in why
    with pytest.raises(ValueError, match="backend onnxruntime needs onnxruntime"):
        resolve_runtime("int8", support=cpu_support(VNNI_ONLY, ""))


def test_auto_without_texts_to_calibrate_on_picks_a_backend_that_needs_none(fp32_model, tmp_path):
    from ee_model import load_model

    vnni = cpu_support(VNNI_ONLY, "")
    assert resolve_runtime("auto", support=vnni)[0] == Runtime("int8", "openvino")
    assert resolve_runtime("auto", support=vnni, can_calibrate=False)[0] == Runtime("int8", "onnxruntime")
    assert resolve_runtime("int8", "openvino", support=vnni, can_calibrate=False)[0].backend == "openvino"
    for flags in (ZEN4, AMX):  # without texts, bf16 comes before ONNX Runtime's dynamic int8 (measured)
        runtime, why = resolve_runtime("auto", support=cpu_support(flags, ""), can_calibrate=False)
        assert runtime == Runtime("bf16", "openvino") and "not int8-openvino: no texts to calibrate" in why
    saved = fp32_model("bert").save_pretrained(tmp_path / "model")
    assert load_model(saved, "int8", threads=1).runtime == Runtime("int8", "onnxruntime")  # no texts given


def test_runtime_names_round_trip():
    for name in ("fp32", "bf16", "int8", "bf16-openvino", "fp32-openvino", "int8-openvino"):
        assert Runtime.parse(name).name == name
    assert Runtime.parse("int8") == Runtime("int8") == Runtime("int8", "onnxruntime") and FP32.name == "fp32"
    assert Runtime("bf16").backend == "torch" and Runtime("int8").name == "int8"


@pytest.fixture(scope="module")
def fp32_model(tiny_encoder_dir):
    cache: dict[str, torch.nn.Module] = {}

    def make(family: str):
        if family not in cache:
            cache[family] = trained_tiny(tiny_encoder_dir(family, 2))
        return cache[family]

    return make


def probe_texts() -> list[str]:
    return random_texts(300, seed=3) + labeled_table(100, seed=5)["text"].to_pylist()


@pytest.mark.parametrize(
    "family, name",
    [(family, "bf16") for family in FAMILIES]
    + [pytest.param(family, "bf16-openvino", marks=needs_bf16_units) for family in FAMILIES]
    + [pytest.param(family, "bf16", marks=pytest.mark.slow) for family in NEWER_FAMILIES],
)
def test_bf16_runtimes_agree_with_fp32(family, name, fp32_model, tmp_path):
    fp32 = fp32_model(family)
    runtime = Runtime.parse(name)
    folder = build_layers(fp32, runtime, tmp_path / "layers")
    model = with_runtime(copy.deepcopy(fp32), runtime, folder, threads=1)
    assert model.runtime == runtime
    texts = probe_texts()
    for policy in ("none", "entropy"):
        reference = fp32.predict(texts, policy=policy, batch_size=64)
        out = model.predict(texts, policy=policy, batch_size=64)
        assert np.mean(np.array(out.label) == np.array(reference.label)) >= MIN_LABEL_AGREEMENT, policy
        assert np.mean(out.exit_layer == reference.exit_layer) >= MIN_EXIT_LAYER_AGREEMENT, policy
    assert len(set(reference.exit_layer.tolist())) > 1  # rows leave at different layers: exits are tested
    error = pooled_error(fp32, model, texts[:64])
    assert (error < MAX_HIDDEN_ERROR).all(), error.tolist()
    assert (error > 0).all()  # the reduced-precision layers really ran
    with pytest.raises(ValueError, match="save the fp32 model"):
        model.save_pretrained(tmp_path / "saved")


MAX_INT8_HIDDEN_ERROR = 0.15  # as for ONNX Runtime int8 (tests/ee_model/test_int8.py)


# behind the slow marker: each family trains a model and quantises it (10-30 s each)
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_openvino_int8_layers_calibrated_on_texts_agree_with_fp32(family, fp32_model, tmp_path):
    from ee_model.openvino_layers import MANIFEST, read_manifest

    fp32 = fp32_model(family)
    runtime = Runtime("int8", "openvino")
    texts = probe_texts()
    folder = build_layers(fp32, runtime, tmp_path / "layers", random_texts(200, seed=21))
    assert read_manifest(folder)["calibration_rows"] == 200
    model = with_runtime(copy.deepcopy(fp32), runtime, folder, threads=1)
    for policy in ("none", "entropy"):
        reference = fp32.predict(texts, policy=policy, batch_size=64)
        out = model.predict(texts, policy=policy, batch_size=64)
        assert np.mean(np.array(out.label) == np.array(reference.label)) >= MIN_LABEL_AGREEMENT, policy
        assert np.mean(out.exit_layer == reference.exit_layer) >= MIN_EXIT_LAYER_AGREEMENT, policy
    error = pooled_error(fp32, model, texts[:64])
    assert (error < MAX_INT8_HIDDEN_ERROR).all(), error.tolist()
    assert (error > 0).all()  # the int8 layers really ran
    # static scales: a row's result hardly depends on its batch-mates
    one, many = model.predict(texts[:100], batch_size=1), model.predict(texts[:100], batch_size=64)
    assert np.mean(np.array(one.label) == np.array(many.label)) >= MIN_LABEL_AGREEMENT
    # the f32 IR of bf16 / fp32 and the int8 files are kept apart
    with pytest.raises(ValueError, match="OpenVINO int8 layers in .* were built from other weights"):
        with_runtime(copy.deepcopy(fp32), runtime, build_layers(fp32, BF16_OPENVINO, tmp_path / "ir"))
    assert (folder / MANIFEST).is_file()


BF16_OPENVINO = Runtime("bf16", "openvino")


def test_runtimes_that_export_layers_run_bert_like_encoders_only():
    from ee_model.runtime_layers import resolve_encoder_runtime

    vnni, amx = cpu_support(VNNI_ONLY, ""), cpu_support(AMX, "")
    int8, why = resolve_runtime(support=vnni)
    assert int8 == Runtime("int8", "openvino") and why.startswith("int8 dot products but no bf16")
    assert resolve_encoder_runtime("roberta", support=vnni) == (int8, why)
    runtime, reason = resolve_encoder_runtime("modernbert", support=vnni)
    assert runtime == FP32 and "ModernBERT layers are not exported one by one, so fp32" in reason
    runtime, reason = resolve_encoder_runtime("modernbert", support=amx)  # first torch in auto's list
    assert runtime == BF16 and "ModernBERT layers are not exported one by one, so bf16 on torch" in reason
    zen4 = cpu_support(ZEN4, "")  # int8 here runs exported layers only: the fastest on torch is bf16
    assert resolve_encoder_runtime("modernbert", support=zen4)[0] == BF16
    assert resolve_encoder_runtime("modernbert", "bf16", support=amx)[0] == BF16
    with pytest.raises(ValueError, match="runtime int8-openvino exports the layers .* DeBERTa-v2/v3 layers"):
        resolve_encoder_runtime("deberta-v2", "int8", "openvino", support=vnni)
    assert resolve_encoder_runtime("deberta-v2", "bf16", "torch", support=amx) == (BF16, "asked for")


def test_openvino_int8_needs_calibration_texts_drawn_only_to_build(fp32_model, tmp_path):
    fp32 = fp32_model("bert")
    for texts in (None, [], [None, "  "]):
        with pytest.raises(ValueError, match="give calibration_texts"):
            build_layers(fp32, Runtime("int8", "openvino"), tmp_path / "layers", texts)
    assert not (tmp_path / "layers").exists()
    drawn = []  # texts may come from a function (the scoring driver reads its inputs): called to build only

    def draw() -> list[str]:
        drawn.append(1)
        return random_texts(64, seed=4)

    with pytest.warns(UserWarning, match="calibrated on 64 rows, fewer than"):
        build_layers(fp32, Runtime("int8", "openvino"), tmp_path / "layers", draw)
    assert len(drawn) == 1  # (64 rows: a later build is given the chance to calibrate on more)
    build_layers(fp32, Runtime("fp32", "openvino"), tmp_path / "ir", draw)  # calibrates nothing
    assert len(drawn) == 1


def test_openvino_layers_of_other_weights_are_refused_and_a_cache_is_reused(fp32_model, tmp_path):
    from ee_model.openvino_layers import MANIFEST

    fp32 = fp32_model("bert")
    runtime = Runtime("fp32", "openvino")  # (bf16's files are the same f32 IR)
    folder = build_layers(fp32, runtime, tmp_path / "ov")
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    assert build_layers(fp32, runtime, folder) == folder and (folder / MANIFEST).stat().st_mtime_ns == stamp
    other = trained_tiny(str(fp32.config.encoder_name_or_path), steps=5)
    with pytest.raises(ValueError, match="OpenVINO layers in .* were built from other weights"):
        with_runtime(copy.deepcopy(other), runtime, folder)
    with pytest.raises(ValueError, match="holds no OpenVINO layers"):
        with_runtime(copy.deepcopy(other), runtime, tmp_path)
    with pytest.raises(ValueError, match="already runs bf16 layers"):
        with_runtime(with_runtime(copy.deepcopy(fp32), BF16), BF16)


def test_calibration_measures_a_bf16_knob_in_the_exit_engine(fp32_model):
    from pipelines.config import S_GRID
    from pipelines.evaluation.agreement import agreement_pass
    from pipelines.evaluation.thresholds import lower_bound
    from pipelines.scoring.calibration import calibrate

    model = with_runtime(copy.deepcopy(fp32_model("bert")), BF16)
    texts = random_texts(400, seed=11)
    calibration = calibrate(model, texts, "entropy", 0.95, 0.05, S_GRID)
    assert calibration.met and "exit engine" in calibration.reason
    full = agreement_pass(model, texts).labels.numpy()
    engine = model.predict(texts, policy="entropy", threshold=calibration.knob, batch_size=64)
    kept = int((engine.label_id == full).sum())
    assert calibration.agreement_bound == pytest.approx(lower_bound(kept, len(texts), 0.05))


def test_a_saved_model_loads_in_a_runtime_building_its_layers_once(fp32_model, tmp_path):
    from ee_model import load_model
    from ee_model.openvino_layers import MANIFEST

    saved = fp32_model("distilbert").save_pretrained(tmp_path / "model")
    precision = "bf16" if cpu_support().has_bf16 else "fp32"  # one this CPU runs (bf16 is refused without it)
    runtime = Runtime(precision, "openvino")
    loaded = load_model(saved, precision, "openvino", threads=1)
    assert loaded.runtime == runtime and (saved / runtime.name / MANIFEST).is_file()
    stamp = (saved / runtime.name / MANIFEST).stat().st_mtime_ns
    texts = probe_texts()[:100]
    again = load_model(saved, precision, "openvino", threads=1)
    assert again.predict(texts).label == loaded.predict(texts).label
    assert (saved / runtime.name / MANIFEST).stat().st_mtime_ns == stamp  # built once, reused
    assert load_model(saved, "fp32").runtime == FP32
    with pytest.raises(ValueError, match="is not one of"):
        load_model(saved, "fp16")


@pytest.mark.parametrize(
    "precision, hint, flags, expected",
    [
        ("bf16", None, AMX, torch.bfloat16),
        ("int8", None, AMX, torch.bfloat16),  # what the quantiser leaves runs in bf16 there
        ("int8", "f32", AMX, torch.float32),
        ("int8", None, VNNI_ONLY, torch.float32),
        ("fp32", None, AMX, torch.float32),
    ],
)
def test_openvino_layers_pass_bf16_between_layers_where_they_compute_in_it(precision, hint, flags, expected):
    from ee_model.openvino_layers import boundary_dtype

    assert boundary_dtype(precision, hint, cpu_support(flags, "")) == expected


def test_openvino_layers_return_hidden_states_in_their_boundary_dtype(fp32_model, tmp_path):
    from ee_model.openvino_layers import boundary_dtype

    fp32 = fp32_model("bert")
    hidden = torch.randn(3, 7, fp32.encoder.config.hidden_size)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    for precision in ("bf16", "fp32") if cpu_support().has_bf16 else ("fp32",):  # bf16 is refused without
        runtime = Runtime(precision, "openvino")
        folder = build_layers(fp32, runtime, tmp_path / "ir")
        model = with_runtime(copy.deepcopy(fp32), runtime, folder, threads=1)
        inputs = encoders.LayerInputs(model.encoder, hidden, mask).for_layer(0)
        out = encoders.run_layer(model.layers[0], hidden, inputs)
        assert out.dtype == boundary_dtype(precision) and out.shape == hidden.shape
        again = encoders.run_layer(model.layers[1], out, inputs)  # a layer takes what the one before gives
        assert again.dtype == out.dtype and torch.isfinite(again.float()).all()
        # several actors on one node each compile the layers: none pins its threads to cores of its choice
        compiled = model.layers[0].request.get_compiled_model()
        assert compiled.get_property("ENABLE_CPU_PINNING") is False
        assert compiled.get_property("INFERENCE_NUM_THREADS") == 1


@pytest.mark.slow  # an accuracy measurement: CI and the capped CI step run it
def test_openvino_int8_calibrated_on_too_few_rows_is_rebuilt_when_more_come(fp32_model, tmp_path):
    """Layers calibrated on fewer than CALIBRATION_ROWS texts (a first input of 5 rows) are built, with a
    warning, and kept only until a build is given more: the calibration is part of what the cache checks."""
    from ee_model.openvino_layers import CALIBRATION_ROWS, MANIFEST, read_manifest

    fp32, runtime = fp32_model("bert"), Runtime("int8", "openvino")
    with pytest.warns(UserWarning, match=rf"calibrated on 5 rows, fewer than {CALIBRATION_ROWS}: .* rebuilt"):
        folder = build_layers(fp32, runtime, tmp_path / "layers", random_texts(5, seed=1))
    assert read_manifest(folder)["calibration_rows"] == 5
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    assert build_layers(fp32, runtime, folder, random_texts(5, seed=2)) == folder  # no more rows: kept
    assert build_layers(fp32, runtime, folder) == folder  # loading with no texts at hand: kept
    assert (folder / MANIFEST).stat().st_mtime_ns == stamp
    build_layers(fp32, runtime, folder, random_texts(CALIBRATION_ROWS + 50, seed=3))  # enough: rebuilt
    assert read_manifest(folder)["calibration_rows"] == CALIBRATION_ROWS
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    drawn = []
    build_layers(fp32, runtime, folder, lambda: drawn.append(1) or random_texts(900, seed=4))
    assert (folder / MANIFEST).stat().st_mtime_ns == stamp and not drawn  # pinned: nothing drawn, kept
    with_runtime(copy.deepcopy(fp32), runtime, folder, threads=1)


@pytest.mark.slow  # an accuracy measurement: CI and the capped CI step run it
def test_openvino_int8_on_a_cpu_without_vnni_keeps_the_attention_in_float(fp32_model, tmp_path):
    """Without int8 dot products the attention's activation x activation products saturate (96 % agreement on
    an emulated Zen 3, test_int8_without_vnni.py): for such a CPU they stay unquantised and the weights get
    NNCF's overflow fix. Recorded in the manifest; the loader checks the layers against what they were built
    with, and warns where that is not this CPU's setting."""
    from ee_model.openvino_layers import openvino_layers, quantization_settings, read_manifest

    assert quantization_settings(cpu_support(VNNI_ONLY, "")) == {}
    no_vnni = quantization_settings(cpu_support(OLD, ""))
    assert no_vnni == {"activation_products": "float", "overflow_fix": "enable"}
    fp32, texts = fp32_model("bert"), random_texts(300, seed=21)
    default = openvino_layers(fp32, tmp_path / "default", "int8", texts, settings={})
    for_old = openvino_layers(fp32, tmp_path / "old", "int8", texts, settings=no_vnni)
    assert read_manifest(for_old)["settings"] == no_vnni and read_manifest(default)["settings"] == {}

    def quantised_inputs(folder):
        return (folder / "layer_0.xml").read_text().count('type="FakeQuantize"')

    assert quantised_inputs(for_old) < quantised_inputs(default)  # the attention's inputs are not quantised
    built_here = default if quantization_settings() == {} else for_old
    built_elsewhere = for_old if built_here is default else default
    model = with_runtime(copy.deepcopy(fp32), Runtime("int8", "openvino"), built_here, threads=1)
    with pytest.warns(UserWarning, match="were quantised with .* labels may agree less with fp32"):
        with_runtime(copy.deepcopy(fp32), Runtime("int8", "openvino"), built_elsewhere, threads=1)
    probe = probe_texts()  # this CPU's settings hold agreement (under ONEDNN_MAX_CPU_ISA=AVX2 too, where
    # OpenVINO's kernels take their AVX2 path and the VNNI settings agreed on 96.5 %)
    reference = fp32.predict(probe, batch_size=64)
    assert np.mean(np.array(model.predict(probe, batch_size=64).label) == np.array(reference.label)) >= 0.99


def test_bf16_openvino_layers_are_refused_on_a_cpu_without_bf16_units(fp32_model, tmp_path, monkeypatch):
    import ee_model.openvino_layers as openvino_layers

    fp32 = fp32_model("bert")
    folder = build_layers(fp32, Runtime("fp32", "openvino"), tmp_path / "ir")
    monkeypatch.setattr(openvino_layers, "cpu_support", lambda: cpu_support(VNNI_ONLY, ""))
    refused = r"bf16 OpenVINO layers need a CPU with AMX-BF16 or AVX512-BF16"
    with pytest.raises(ValueError, match=refused) as e:
        with_runtime(copy.deepcopy(fp32), Runtime("bf16", "openvino"), folder, threads=1)
    assert "\n" not in str(e.value)
    assert with_runtime(copy.deepcopy(fp32), Runtime("fp32", "openvino"), folder, threads=1).runtime.backend


@pytest.mark.parametrize(
    "backend, flags, expected",
    [
        ("openvino", OLD, "fp32-openvino"),  # what auto picks here (fp32) does not run on OpenVINO: its fp32
        ("openvino", ZEN4, "int8-openvino"),
        ("onnxruntime", OLD, "int8"),  # ONNX Runtime runs int8 only, on any CPU (7-bit weights without VNNI)
        ("torch", OLD, "fp32"),
        ("torch", ZEN4, "bf16"),
    ],
)
def test_auto_precision_on_a_named_backend_chooses_among_that_backends_runtimes(backend, flags, expected):
    runtime, why = resolve_runtime("auto", backend, support=cpu_support(flags, ""))
    assert runtime.name == expected and runtime.backend == backend and why
