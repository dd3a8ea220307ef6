"""int8 layers on a CPU without VNNI, measured where there is none: the layers are built here with the
settings for such a CPU (`quantization_settings`), then run under QEMU's user-mode emulator as an AMD EPYC
Zen 3 (`qemu-x86_64 -cpu EPYC-Milan`: AVX2, no AVX-512, no VNNI), so ONNX Runtime's and OpenVINO's kernels
take the AVX2 paths they take on such a CPU (they read CPUID themselves; ONEDNN_MAX_CPU_ISA does not reach
ONNX Runtime). The emulator reproduces the real Zen 3's figures: with the VNNI CPUs' settings, labels agreed
with fp32 on 98.8 / 98.4 % (ONNX Runtime, bert / distilbert) and 96.5 / 96.25 % (OpenVINO) of this suite's
models' rows, the very figures the real CPU gave (docs/results.md "int8 on a CPU without VNNI"). About 10x
slower than the host, so one family, one minute. Skipped where qemu-x86_64 is absent (`.ci/run` installs
Debian's qemu-user) or the host is not x86-64."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ee_model.cpu_support import cpu_support
from ee_model.int8 import int8_layers
from ee_model.int8 import quantization_settings as onnx_settings
from ee_model.openvino_layers import openvino_layers
from ee_model.openvino_layers import quantization_settings as openvino_settings
from tests.conftest import labeled_table, random_texts, trained_tiny

ROOT = Path(__file__).resolve().parents[2]
EMULATED = "EPYC-Milan"  # AMD Zen 3: AVX2, FMA; no AVX-512, no VNNI, no bf16
AVX2_ONLY = cpu_support(frozenset({"avx2", "fma"}), "")
MIN_LABEL_AGREEMENT = 0.99  # as on every CPU (tests/ee_model/test_int8.py)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("qemu-x86_64") is None, reason="needs qemu-x86_64 (apt-get install qemu-user)"
    ),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU"),
]


def test_int8_layers_agree_with_fp32_on_a_cpu_without_vnni(tiny_encoder_dir, tmp_path):
    fp32 = trained_tiny(tiny_encoder_dir("bert", 2))
    fp32.save_pretrained(tmp_path / "model")
    int8_layers(fp32, tmp_path / "int8", settings=onnx_settings(AVX2_ONLY))
    calibration = random_texts(300, seed=21)
    openvino_layers(
        fp32, tmp_path / "int8-openvino", "int8", calibration, settings=openvino_settings(AVX2_ONLY)
    )
    texts = random_texts(300, seed=3) + labeled_table(100, seed=5)["text"].to_pylist()
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        ["qemu-x86_64", "-cpu", EMULATED, sys.executable, "-m", "tests.ee_model.emulated_cpu", str(tmp_path)],
        cwd=ROOT,
        env=environment,
        check=True,
        capture_output=True,
        timeout=600,
    )
    emulated = json.loads((tmp_path / "labels.json").read_text())
    assert emulated["capability"] == "AVX2"  # the kernels saw a CPU without AVX-512 (and so without VNNI)
    for name in ("int8", "int8-openvino"):
        for policy in ("none", "entropy"):
            reference = [str(label) for label in fp32.predict(texts, policy=policy, batch_size=64).label]
            agreement = np.mean(np.array(emulated[name][policy]) == np.array(reference))
            assert agreement >= MIN_LABEL_AGREEMENT, (name, policy, agreement)
