"""The model and the training steps on each device: CPU always, CUDA (bf16 autocast, NCCL) where a GPU is.

The DDP cases wrap the model the way Ray Train's `prepare_model` does (DistributedDataParallel with the
default find_unused_parameters=False), in a one-process group: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ee_model.io import unwrap
from ee_model.signals import normalised_entropy
from pipelines.evaluation.passes import exit_logits
from pipelines.training.stages import STAGES
from pipelines.training.steps import train_step
from tests.conftest import free_port, labeled_table, random_texts

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


@pytest.fixture
def process_group(request):
    backend = "nccl" if request.param == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    yield torch.device(request.param)
    dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_predict_on_device_matches_cpu_at_any_batch_size(tiny_model, device):
    model = tiny_model("bert", num_layers=4, seed=3)
    texts = random_texts(40, seed=5)
    # S = the median layer-1 entropy: about half the rows leave at layer 1, the rest go on (any random init)
    layer1 = full_pass_logits(model, texts)[0]
    ordered = normalised_entropy(layer1).sort().values
    threshold = float(ordered[19] + ordered[20]) / 2  # midway between neighbours: no row sits on S
    reference = model.predict(texts, threshold=threshold, batch_size=1)
    assert len(set(reference.exit_layer.tolist())) >= 2
    moved = copy.deepcopy(model).to(device)
    for batch_size in (1, 7, 40):
        out = moved.predict(texts, threshold=threshold, batch_size=batch_size)
        assert out.label == reference.label
        np.testing.assert_array_equal(out.exit_layer, reference.exit_layer)
        np.testing.assert_allclose(out.probs, reference.probs, atol=1e-4)


def full_pass_logits(model, texts):
    encoded = model.tokenizer(
        texts, truncation=True, max_length=model.config.max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(encoded["input_ids"], encoded["attention_mask"], encoded.get("token_type_ids")).logits


@pytest.mark.parametrize("process_group", ["cpu", CUDA], indirect=True)
@pytest.mark.parametrize("stage", ["stage1", "stage2", "joint"])
def test_training_steps_under_ddp(tiny_model, process_group, stage):
    device = process_group
    model = tiny_model("bert", num_layers=3, seed=1).to(device)
    frozen_before = None
    if stage == "stage2":
        model.freeze_for_stage2()
        frozen_before = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if k.startswith(("encoder.", "heads.2."))
        }
    model.train()
    wrapped = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None
    )
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    config = SimpleNamespace(focal_gamma=0.0, kl_weight=1.0, gold_weight=0.0, joint_weighting="uniform")
    table = labeled_table(96)
    ids = np.arange(96) % 3  # labeled_table cycles through its 3 classes
    batches = [
        {"text": table["text"].to_pylist()[i : i + 16], "label_id": ids[i : i + 16]} for i in range(0, 96, 16)
    ]
    losses = [
        train_step(wrapped, batch, STAGES[stage], STAGES[stage].loss(config), optimizer, scheduler, device)
        for _ in range(4)
        for batch in batches
    ]
    assert all(np.isfinite(losses)) and np.mean(losses[-6:]) < np.mean(losses[:6])
    recorded = exit_logits(wrapped, batches, device)
    logits, labels = recorded.logits, recorded.labels
    assert logits.shape == (3, 96, 3) and logits.dtype == torch.float32 and labels.shape == (96,)
    if frozen_before is not None:
        after = unwrap(wrapped).state_dict()
        assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
