"""Int8 layers (ee_model.int8, ONNX Runtime) against the fp32 model they come from, per encoder family.

The models are trained briefly on the tiny separable task first: untrained heads give near-uniform outputs,
and labels of near-ties would agree or not by chance. Measured on this suite's models (2 layers, hidden 32,
60 steps; 500 rows of mixed lengths): labels agree on 99.4-100 % at full depth and with early exit, exit
layers are equal on 99.4-100 % of rows, and each layer's pooled hidden state is within 0.5-5.3 % (relative L2)
of fp32's. With the padding mask ignored, the same error is 81-188 %, so the bound below catches mask bugs.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from ee_model.int8 import MANIFEST, int8_layers, load_int8, with_int8_layers
from tests.conftest import FAMILIES, labeled_table, pooled_error, random_texts, trained_tiny

MIN_LABEL_AGREEMENT = 0.99
MIN_EXIT_LAYER_AGREEMENT = 0.98
MAX_HIDDEN_ERROR = 0.15  # relative L2 of a layer's pooled hidden state


@pytest.fixture(scope="module")
def fp32_and_int8(tiny_encoder_dir, tmp_path_factory):
    """Factory: (fp32 model, the same weights with int8 layers, the int8 folder), per family, cached."""
    cache: dict[str, tuple] = {}

    def make(family: str):
        if family not in cache:
            fp32 = trained_tiny(tiny_encoder_dir(family, 2))
            folder = int8_layers(fp32, tmp_path_factory.mktemp(f"int8-{family}") / "layers")
            quantized = with_int8_layers(copy.deepcopy(fp32), folder, threads=1)
            cache[family] = (fp32, quantized, folder)
        return cache[family]

    return make


def probe_texts() -> list[str]:
    return random_texts(400, seed=3) + labeled_table(100, seed=5)["text"].to_pylist()


# every family but bert behind the slow marker: each trains a model and exports it (seconds each)
@pytest.mark.parametrize(
    "family", [f if f == "bert" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)
def test_int8_agrees_with_fp32(family, fp32_and_int8):
    fp32, quantized, _ = fp32_and_int8(family)
    texts = probe_texts()
    for policy in ("none", "entropy"):
        reference = fp32.predict(texts, policy=policy, batch_size=64)
        out = quantized.predict(texts, policy=policy, batch_size=64)
        labels = np.mean(np.array(out.label) == np.array(reference.label))
        assert labels >= MIN_LABEL_AGREEMENT, (policy, labels)
        assert np.mean(out.exit_layer == reference.exit_layer) >= MIN_EXIT_LAYER_AGREEMENT, policy
    assert len(set(reference.exit_layer.tolist())) > 1  # rows leave at different layers: exits are tested
    error = pooled_error(fp32, quantized, texts[:64])
    assert (error < MAX_HIDDEN_ERROR).all(), error.tolist()
    assert (error > 0).all()  # the int8 layers really ran


def test_int8_rows_exit_alike_at_any_batch_size(fp32_and_int8):
    """Per-row exit is unchanged; a row's int8 activations are scaled with its batch-mates', so results may
    move a little with the batch size (not bit for bit as fp32)."""
    _, quantized, _ = fp32_and_int8("bert")
    texts = probe_texts()[:200]
    one = quantized.predict(texts, batch_size=1)
    many = quantized.predict(texts, batch_size=64)
    assert np.mean(np.array(one.label) == np.array(many.label)) >= MIN_LABEL_AGREEMENT
    assert np.mean(one.exit_layer == many.exit_layer) >= MIN_EXIT_LAYER_AGREEMENT


def test_bad_input_gets_the_same_defined_result(fp32_and_int8):
    fp32, quantized, _ = fp32_and_int8("bert")
    texts = ["good great fine", None, "", 42, "bad awful day"]
    reference, out = fp32.predict(texts, invalid="null"), quantized.predict(texts, invalid="null")
    assert out.error == reference.error
    assert out.label[1:4] == [None, None, None] and np.isnan(out.confidence[1:4]).all()
    assert (out.exit_layer[1:4] == 0).all()
    with pytest.raises(ValueError, match="row 1"):
        quantized.predict(texts)


def test_layers_are_built_once_and_checked(fp32_and_int8, tmp_path, tiny_encoder_dir):
    fp32, quantized, folder = fp32_and_int8("bert")
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    assert int8_layers(fp32, folder) == folder  # current: reused, not exported again
    assert (folder / MANIFEST).stat().st_mtime_ns == stamp
    other = trained_tiny(tiny_encoder_dir("bert", 2), steps=5)  # same shapes, other weights
    with pytest.raises(ValueError, match="other weights"):
        with_int8_layers(other, folder)
    with pytest.raises(ValueError, match="no int8 layers"):
        with_int8_layers(other, tmp_path)
    with pytest.raises(ValueError, match="save the fp32 model"):
        quantized.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="already runs int8"):
        with_int8_layers(quantized, folder)
    assert not [p for p in os.listdir(folder.parent) if ".tmp-" in p]  # no staging folder left


@pytest.mark.slow  # exports the layers again (15 s)
def test_stale_layers_are_rebuilt_and_a_saved_model_loads_in_int8(fp32_and_int8, tmp_path):
    fp32, quantized, folder = fp32_and_int8("distilbert")
    saved = fp32.save_pretrained(tmp_path / "model")
    loaded = load_int8(saved, threads=1)  # builds <model>/int8 on first use
    assert (saved / "int8" / MANIFEST).is_file()
    texts = probe_texts()[:100]
    assert loaded.predict(texts).label == quantized.predict(texts).label  # same weights, same int8 layers
    other = trained_tiny(str(fp32.config.encoder_name_or_path), steps=5)
    rebuilt = int8_layers(other, saved / "int8")  # stale for these weights: exported again in place
    with_int8_layers(copy.deepcopy(other), rebuilt, threads=1)


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_a_damaged_layer_file_is_refused_and_rebuilt(fp32_and_int8, tmp_path, damage):
    """The manifest vouches for every file it lists: a layer copied over another (a valid ONNX graph, wrong
    weights) or cut short is caught before use, named with its folder, and rebuilt with a warning."""
    import shutil

    fp32, quantized, folder = fp32_and_int8("bert")
    copy_of = shutil.copytree(folder, tmp_path / "layers")
    if damage == "overwrite":
        shutil.copyfile(copy_of / "layer_0.onnx", copy_of / "layer_1.onnx")
    else:
        data = (copy_of / "layer_1.onnx").read_bytes()
        (copy_of / "layer_1.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"int8 layers in {copy_of} are damaged \(layer_1.onnx"):
        with_int8_layers(copy.deepcopy(fp32), copy_of, threads=1)
    with pytest.warns(UserWarning, match=r"are damaged \(layer_1.onnx not as written\): rebuilding them"):
        assert int8_layers(fp32, copy_of) == copy_of
    rebuilt = with_int8_layers(copy.deepcopy(fp32), copy_of, threads=1)
    texts = probe_texts()[:100]
    assert rebuilt.predict(texts).label == quantized.predict(texts).label


NO_VNNI = frozenset({"avx2", "fma"})  # an AVX2-only CPU (AMD Zen 3, Intel before Cascade Lake)
WITH_VNNI = frozenset({"avx512f", "avx512_vnni"})


@pytest.mark.slow  # an accuracy measurement: CI and the capped CI step run it
def test_a_cpu_without_vnni_gets_7_bit_weights_that_hold_agreement(fp32_and_int8, tmp_path):
    """Without int8 dot products ONNX Runtime sums u8 x s8 pairs in 16 bits and saturates (agreement
    98.4-98.8 % on an emulated Zen 3, test_int8_without_vnni.py); 7-bit weights cannot saturate. The
    setting is the CPU's, recorded in the manifest and checked: layers built for another CPU are rebuilt
    here, and a node handed them warns."""
    from ee_model.cpu_support import cpu_support
    from ee_model.int8 import quantization_settings

    assert quantization_settings(cpu_support(NO_VNNI, "")) == {"reduce_range": True}
    assert quantization_settings(cpu_support(WITH_VNNI, "")) == {"reduce_range": False}
    assert quantization_settings(cpu_support(WITH_VNNI, "AVX2")) == {"reduce_range": True}  # oneDNN's cap
    fp32, _, _ = fp32_and_int8("bert")
    other = {"reduce_range": not quantization_settings()["reduce_range"]}  # the other kind of CPU's
    folder = int8_layers(fp32, tmp_path / "layers", settings=other)
    assert json.loads((folder / MANIFEST).read_text())["settings"] == other
    with pytest.warns(UserWarning, match=r"were quantised with \{'reduce_range': .*labels may agree less"):
        quantized = with_int8_layers(copy.deepcopy(fp32), folder, threads=1)
    texts = probe_texts()
    reference = fp32.predict(texts, batch_size=64)
    agreement = np.mean(np.array(quantized.predict(texts, batch_size=64).label) == np.array(reference.label))
    assert agreement >= MIN_LABEL_AGREEMENT  # both settings hold on this CPU
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    assert int8_layers(fp32, folder) == folder and (folder / MANIFEST).stat().st_mtime_ns != stamp  # rebuilt
    assert json.loads((folder / MANIFEST).read_text())["settings"] == quantization_settings()
