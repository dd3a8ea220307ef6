"""Run by tests/ee_model/test_int8_without_vnni.py under an emulated CPU: a saved model in each runtime whose
layers were built beside it, the labels it gives for the texts, and the CPU capability PyTorch sees.

    qemu-x86_64 -cpu EPYC-Milan python -m tests.ee_model.emulated_cpu <folder>

<folder> holds `model/`, one folder of layers per runtime name (`int8`, `int8-openvino`) and `texts.json`;
`labels.json` is written there.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import torch

from ee_model import EarlyExitClassifier
from ee_model.runtime import Runtime
from ee_model.runtime_layers import with_runtime


def main(folder: Path) -> None:
    texts = json.loads((folder / "texts.json").read_text())
    fp32 = EarlyExitClassifier.from_pretrained(folder / "model")
    labels = {"capability": torch.backends.cpu.get_cpu_capability()}
    for name in ("int8", "int8-openvino"):
        with warnings.catch_warnings():  # /proc/cpuinfo shows the host's flags here, not the emulated CPU's
            warnings.simplefilter("ignore")
            model = with_runtime(copy.deepcopy(fp32), Runtime.parse(name), folder / name, threads=1)
        labels[name] = {
            policy: [str(label) for label in model.predict(texts, policy=policy, batch_size=64).label]
            for policy in ("none", "entropy")
        }
    (folder / "labels.json").write_text(json.dumps(labels))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
