"""`auto` by measurement (ee_model.runtime_choice): the candidates each kind of CPU gets (injected flags and
architecture), the pick over measurements (the agreement floor, the margin, failures), a real timing of
the candidates this machine runs on a tiny model, and what the decision depends on."""

from __future__ import annotations

from pathlib import Path

import pytest

from ee_model.cpu_support import cpu_support
from ee_model.runtime import resolve_runtime
from ee_model.runtime_choice import (
    Measurement,
    RuntimeChoice,
    cpu_candidates,
    decision_key,
    key_digest,
    measure_runtimes,
    pick,
)
from tests.conftest import random_texts, trained_tiny

AMX = frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"})
ZEN4 = frozenset({"avx512f", "avx512_vnni", "avx512_bf16"})
ZEN3 = frozenset({"avx2", "fma"})  # AVX2 only: no VNNI, no bf16
VNNI_ONLY = frozenset({"avx512f", "avx512_vnni"})
ARM_BF16 = frozenset({"fp", "asimd", "asimddp", "i8mm", "bf16"})  # e.g. Graviton 3, Neoverse V1
ARM_PLAIN = frozenset({"fp", "asimd", "asimddp"})  # e.g. Graviton 2, Neoverse N1


def installed(backend: str) -> None:  # every backend installed: the candidates depend on the CPU only
    return None


@pytest.mark.parametrize(
    "flags, arch, cap, expected",
    [
        (AMX, "x86_64", "", ["fp32", "bf16", "int8", "bf16-openvino", "int8-openvino"]),
        (ZEN4, "x86_64", "", ["fp32", "bf16", "int8", "bf16-openvino", "int8-openvino"]),
        (ZEN3, "x86_64", "", ["fp32", "int8", "int8-openvino"]),  # int8 timed: it may pay without VNNI
        (VNNI_ONLY, "x86_64", "", ["fp32", "int8", "int8-openvino"]),
        (AMX, "x86_64", "AVX2", ["fp32", "int8", "int8-openvino"]),  # as capped: bf16 only emulated
        (ARM_BF16, "aarch64", "", ["fp32", "bf16", "int8"]),  # OpenVINO's ARM plugin: fp16, not a candidate
        (ARM_PLAIN, "aarch64", "", ["fp32", "int8"]),
        (frozenset(), "x86_64", "", ["fp32", "int8", "int8-openvino"]),  # flags unreadable
    ],
)
def test_the_candidates_are_what_the_cpu_runs_without_emulating(flags, arch, cap, expected):
    support = cpu_support(flags, cap, arch)
    candidates, left_out = cpu_candidates(support, installed=installed)
    assert [r.name for r in candidates] == expected
    assert set(left_out) | set(expected) == {"fp32", "bf16", "int8", "bf16-openvino", "int8-openvino"}
    if "bf16" in left_out:
        assert "emulated" in left_out["bf16"]


def test_candidates_follow_the_backend_the_family_and_the_texts_at_hand():
    amx = cpu_support(AMX, "")
    names = lambda **kw: [r.name for r in cpu_candidates(amx, installed=installed, **kw)[0]]  # noqa: E731
    assert names(backend="openvino") == ["bf16-openvino", "int8-openvino"]
    assert names(backend="torch") == ["fp32", "bf16"]
    assert names(exportable=False) == ["fp32", "bf16"]  # e.g. ModernBERT: only PyTorch runs its layers
    assert names(can_calibrate=False) == ["fp32", "bf16", "int8", "bf16-openvino"]
    missing = cpu_candidates(amx, installed=lambda b: "not installed" if b == "openvino" else None)
    assert [r.name for r in missing[0]] == ["fp32", "bf16", "int8"]
    assert missing[1]["int8-openvino"] == "not installed"


def test_the_flag_table_on_arm_never_picks_openvino():
    runtime, why = resolve_runtime("auto", support=cpu_support(ARM_BF16, "", "aarch64"))
    assert runtime.backend != "openvino" and "(aarch64)" in why


def measured(name, rows_per_s, agreement=1.0, error=None):
    return Measurement(name, rows_per_s, agreement, error=error)


def test_pick_keeps_the_fastest_above_the_floor_and_the_simpler_within_the_margin():
    runtime, why = pick([measured("fp32", 100), measured("int8", 160), measured("int8-openvino", 150)])
    assert runtime == "int8" and "the fastest measured" in why
    # int8 without VNNI saturating: below the floor, out, however fast
    runtime, why = pick([measured("fp32", 100), measured("int8", 300, agreement=0.95)])
    assert runtime == "fp32" and "below the 0.99 agreement floor: int8 (agreement 0.9500)" in why
    # within 5 %: the simpler runtime, so noise between near-equals does not decide
    runtime, why = pick([measured("fp32", 100), measured("int8-openvino", 104)])
    assert runtime == "fp32" and "the simplest within 5% of the fastest (int8-openvino, 104.0)" in why
    runtime, why = pick([measured("fp32", 100), measured("bf16", 0, error="RuntimeError: no")])
    assert runtime == "fp32" and "could not run: bf16" in why
    with pytest.raises(ValueError, match="agreement floor"):
        pick([measured("int8", 100, agreement=0.5)])


def test_candidates_are_timed_on_the_rows_and_their_layers_kept_for_the_run(tiny_encoder_dir, tmp_path):
    model = trained_tiny(tiny_encoder_dir("bert", num_layers=2))
    # the runtimes this CPU runs in PyTorch and ONNX Runtime (OpenVINO's builds are tested with its layers)
    candidates = [r for r in cpu_candidates()[0] if r.backend != "openvino"]
    texts = random_texts(96, seed=3)
    folder = lambda runtime: tmp_path / runtime.name  # noqa: E731
    first = measure_runtimes(
        model, candidates, texts, model.config.setting(), folder, texts, 1, 16, repeats=2
    )
    assert [m.runtime for m in first] == [r.name for r in candidates]
    fp32 = first[0]
    assert fp32.error is None and fp32.agreement == 1.0 and len(fp32.passes) == 2 and fp32.rows_per_s > 0
    for m in first:
        assert m.error is None, m
        assert m.rows_per_s > 0 and 0.9 <= m.agreement <= 1.0  # the tiny model's labels move little
    assert model.runtime.name == "fp32"  # the model given is left as it was
    built = [r for r in candidates if r.builds_layers]
    assert all(any(Path(folder(r)).iterdir()) for r in built)  # built where the run will look
    again = measure_runtimes(model, built, texts, model.config.setting(), folder, texts, 1, 16, repeats=1)
    before = {m.runtime: m.build_s for m in first}
    assert all(m.build_s < before[m.runtime] for m in again)  # reused, not rebuilt
    runtime, _ = pick(first)
    assert runtime in {r.name for r in candidates}


def test_a_candidate_that_fails_to_build_is_out_with_its_reason(tiny_encoder_dir, tmp_path):
    from ee_model.runtime import FP32, INT8

    model = trained_tiny(tiny_encoder_dir("bert", num_layers=2))
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    texts = random_texts(16, seed=4)
    folders = {"fp32": tmp_path / "fp32", "int8": blocked / "int8"}  # the int8 layers cannot be written
    out = measure_runtimes(model, [FP32, INT8], texts, model.config.setting(), lambda r: folders[r.name])
    assert out[0].error is None and out[1].error is not None and out[1].rows_per_s == 0
    assert pick(out)[0] == "fp32"


def test_the_decision_depends_on_cpu_versions_model_threads_and_candidates():
    from ee_model.runtime import FP32, INT8

    setting = __import__("ee_model").ExitSetting("entropy", 0.3)
    base = decision_key("model-a", [FP32, INT8], 1, 64, setting, cpu_support(ZEN3, ""))
    assert base["flags"] == [] and base["threads"] == 1 and "torch" in base["versions"]
    changed = [
        decision_key("model-b", [FP32, INT8], 1, 64, setting, cpu_support(ZEN3, "")),
        decision_key("model-a", [FP32], 1, 64, setting, cpu_support(ZEN3, "")),
        decision_key("model-a", [FP32, INT8], 2, 64, setting, cpu_support(ZEN3, "")),
        decision_key("model-a", [FP32, INT8], 1, 32, setting, cpu_support(ZEN3, "")),
        decision_key("model-a", [FP32, INT8], 1, 64, setting, cpu_support(ZEN4, "")),
        decision_key("model-a", [FP32, INT8], 1, 64, setting, cpu_support(ZEN4, "AVX2")),
    ]
    digests = {key_digest(k) for k in [base, *changed]}
    assert len(digests) == 1 + len(changed)
    assert key_digest(base) == key_digest(
        decision_key("model-a", [FP32, INT8], 1, 64, setting, cpu_support(ZEN3, ""))
    )
    choice = RuntimeChoice("int8", "why", (measured("int8", 5.0),), {"bf16": "no"}, base, 1.5)
    assert RuntimeChoice.from_dict(choice.to_dict()) == choice
