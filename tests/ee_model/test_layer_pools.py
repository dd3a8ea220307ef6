"""The layer-pool engine: every step runs one layer on a full batch, and results equal per-batch compaction
(exit layers and labels exact, probabilities to 1e-5 in fp32) for every policy and family."""

import numpy as np
import pytest
import torch

from ee_model import make_policy
from ee_model.layer_pools import ExitEngine
from ee_model.policies import ExitPolicy, State
from tests.conftest import ALL_FAMILIES_NEWER_SLOW, random_texts
from tests.ee_model.test_early_exit import EXIT_RISK, random_policies


class TargetLayerPolicy(ExitPolicy):
    """Row i leaves after layer targets[i]: its target and layer count are state that travels with it."""

    name = "target"

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {"target": self.targets.to(device), "layer": torch.zeros(batch_size, dtype=torch.long)}

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        layer = state["layer"] + 1
        return layer >= state["target"], {"target": state["target"], "layer": layer}


def step_sizes(model):
    """Rows of every layer step, per layer, recorded by forward hooks."""
    sizes = {i: [] for i in range(model.n_layers)}
    hooks = [
        layer.register_forward_hook(lambda _m, args, _o, i=i: sizes[i].append(args[0].shape[0]))
        for i, layer in enumerate(model.layers)
    ]
    return sizes, hooks


@pytest.mark.parametrize("model_type", ALL_FAMILIES_NEWER_SLOW)
def test_pools_equal_compaction_for_every_policy(tiny_model, model_type):
    model = tiny_model(model_type, num_layers=4, seed=7)
    batch = model.encode(random_texts(61, seed=5, max_words=50))
    exits_seen = set()
    targets = TargetLayerPolicy(torch.from_numpy(np.random.default_rng(1).choice([1, 2, 3, 4], size=61)))
    for policy, knobs in [*random_policies(seed=11, n_layers=4), ("target", {})]:
        rule = targets if policy == "target" else make_policy(policy, **knobs, exit_risk=EXIT_RISK)
        compaction = model.early_exit(batch["input_ids"], batch["attention_mask"], rule)
        for batch_size in (1, 4, 16, 60):
            pooled = model.early_exit(
                batch["input_ids"], batch["attention_mask"], rule, batch_size=batch_size
            )
            assert pooled.exit_layer.tolist() == compaction.exit_layer.tolist(), (policy, knobs, batch_size)
            assert pooled.tokens.tolist() == compaction.tokens.tolist()
            assert pooled.logits.argmax(1).tolist() == compaction.logits.argmax(1).tolist()
            torch.testing.assert_close(
                torch.softmax(pooled.logits, 1), torch.softmax(compaction.logits, 1), atol=1e-5, rtol=0
            )
        exits_seen.update(compaction.exit_layer.tolist())
    assert len(exits_seen) >= 3


def test_every_step_is_full_until_the_tail_drains(tiny_model):
    model = tiny_model("bert", num_layers=4, seed=7)
    texts = random_texts(200, seed=8)
    rule = TargetLayerPolicy(torch.from_numpy(np.random.default_rng(0).choice([1, 2, 3, 4], size=200)))
    batch = model.encode(texts)
    exit_layer = model.early_exit(batch["input_ids"], batch["attention_mask"], rule).exit_layer
    assert exit_layer.tolist() == rule.targets.tolist()  # the target travelled with each row
    reached = [int((exit_layer > i).sum()) for i in range(model.n_layers)]  # rows that run layer i
    assert 0 < reached[-1] < reached[1] < reached[0] == 200, reached  # rows leave at several layers
    sizes, hooks = step_sizes(model)
    try:
        model.early_exit(batch["input_ids"], batch["attention_mask"], rule, batch_size=16, layer_pools=True)
    finally:
        for hook in hooks:
            hook.remove()
    for layer, steps in sizes.items():
        assert sum(steps) == reached[layer]
        assert all(size <= 16 for size in steps)
        # partial steps only when the input is spent: at most one per layer before its pool empties, and
        # one more where the pool above it refilled it after a partial step
        assert sum(size < 16 for size in steps) <= 2, (layer, steps)
    compaction_steps = len(sizes[0]) + sum(len(s) for s in list(sizes.values())[1:])
    assert compaction_steps < 2 * sum(reached) / 16 + 2 * model.n_layers


def test_without_pools_each_batch_drains_before_the_next_enters(tiny_model):
    """Per-batch compaction (the CPU default): layer 1 runs ceil(rows / batch) steps and no later layer runs
    more steps than that; rows leave at the layer their policy says, as with pools."""
    model = tiny_model("bert", num_layers=4, seed=7)
    batch = model.encode(random_texts(50, seed=8))
    rule = TargetLayerPolicy(torch.from_numpy(np.random.default_rng(2).choice([1, 2, 3, 4], size=50)))
    sizes, hooks = step_sizes(model)
    order = []
    pre = [
        layer.register_forward_pre_hook(lambda _m, _a, i=i: order.append(i))
        for i, layer in enumerate(model.layers)
    ]
    try:
        out = model.early_exit(
            batch["input_ids"], batch["attention_mask"], rule, batch_size=16, layer_pools=False
        )
    finally:
        for hook in hooks + pre:
            hook.remove()
    assert out.exit_layer.tolist() == rule.targets.tolist()
    assert sizes[0] == [16, 16, 16, 2]
    assert all(len(steps) <= 4 for steps in sizes.values())
    # each batch runs layers 1, 2, ... in turn before the next batch's layer 1
    starts = [k for k, layer in enumerate(order) if layer == 0]
    assert all(
        order[a:b] == sorted(order[a:b]) for a, b in zip(starts, [*starts[1:], len(order)], strict=True)
    )


def test_pools_are_the_default_but_for_fp32_on_cpus():
    from ee_model.layer_pools import default_pooling
    from ee_model.runtime import BF16, FP32, Runtime

    assert default_pooling(torch.device("cuda", 0)) and default_pooling("cuda", BF16)
    assert not default_pooling(torch.device("cpu")) and not default_pooling("cpu", FP32)
    assert default_pooling("cpu", BF16) and default_pooling("cpu", Runtime.parse("int8-openvino"))


def test_rows_of_a_step_have_similar_lengths(tiny_model):
    """Inputs enter longest first, so a step pads little: far fewer padded tokens than unsorted batches."""
    model = tiny_model("bert", num_layers=2)
    texts = random_texts(128, seed=2, max_words=60)
    batch = model.encode(texts)
    widths = []
    hook = model.layers[0].register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[:2]))
    try:
        model.early_exit(
            batch["input_ids"], batch["attention_mask"], make_policy("none"), batch_size=16, layer_pools=True
        )
    finally:
        hook.remove()
    padded = sum(rows * width for rows, width in widths)
    real = int(batch["attention_mask"].sum())
    unsorted = 128 * batch["input_ids"].shape[1]
    assert padded < real * 1.2 and unsorted > real * 1.5


def test_predict_tokens_equals_predict_and_keeps_invalid_rows(tiny_model):
    model = tiny_model("electra", num_layers=3, seed=1)
    texts = random_texts(20, seed=4)
    texts[3], texts[11] = None, "  "
    expected = model.predict(
        texts, policy="entropy", threshold=0.6, batch_size=4, invalid="null", layer_pools=True
    )
    valid = [t for t in texts if isinstance(t, str) and t.strip()]
    out = model.predict_tokens(
        model.tokenize(valid),
        errors=expected.error,
        setting=model.config.setting("entropy", 0.6),
        batch_size=4,
    )
    assert out.label == expected.label and out.error == expected.error
    np.testing.assert_array_equal(out.exit_layer, expected.exit_layer)
    np.testing.assert_allclose(out.probs, expected.probs, atol=1e-6)
    with pytest.raises(ValueError, match="rows of token ids"):
        model.predict_tokens(model.tokenize(valid[:-1]), errors=expected.error)


def test_batch_size_must_be_positive(tiny_model):
    model = tiny_model("bert", num_layers=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        ExitEngine(model, make_policy("none"), 0)
    with pytest.raises(ValueError, match="batch_size=0"):
        model.predict_tokens(model.tokenize(["a"]), batch_size=0)


def test_heads_pool_reduced_precision_hidden_states_in_float32():
    from ee_model.heads import pool

    hidden = torch.randn(4, 9, 16)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[2, 5:] = 0
    for pooling in ("cls", "mean"):
        exact = pool(hidden, mask, pooling)
        low = pool(hidden.to(torch.bfloat16), mask, pooling)
        assert exact.dtype == low.dtype == torch.float32
        torch.testing.assert_close(low, exact, atol=0.02, rtol=0.02)


def test_mean_pooling_is_the_mean_of_the_real_tokens():
    from ee_model.heads import pool

    hidden = torch.randn(3, 7, 5)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0] * 7])
    expected = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0), torch.zeros(5)])  # no real token: 0
    torch.testing.assert_close(pool(hidden, mask, "mean"), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
