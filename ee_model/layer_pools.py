"""The exit engine: per-row early exit over many rows, each step one layer on a full batch from a layer pool.

Rows leave after different layers. Running a batch layer by layer and dropping the rows that leave
(compaction) runs every later layer on fewer rows than the batch, which a GPU does inefficiently. Here every
layer has a pool of rows waiting for it. Each step runs one layer (and its exit head) on `batch_size` rows
taken from the deepest pool holding that many, else on the next `batch_size` input rows, else (the input
spent) on the shallowest non-empty pool, so the tail drains with partial steps. Rows that leave write their
results; the others join the next layer's pool, carrying their hidden states, mask and policy state with them.

Inputs arrive sorted by length, so the rows of one step have similar lengths; a step's padding is trimmed to
its longest row (right padding). One device->host read per student step (how many rows leave, and the widest
remaining row); nothing else leaves the device.

With `pool_across_batches=False` each input batch drains through every layer before the next one enters:
per-batch compaction, where later layers run on fewer rows. Which is faster depends on what a layer call
costs besides its rows: a pool's step joins rows from several input batches and so pads to a wider spread
of lengths, while compaction makes many small calls. A GPU wants full batches (a small batch leaves it
idle). On a CPU, fp32 layers cost about the same per row whatever the call's size, so compaction's tighter
padding wins; bf16 and OpenVINO layers pay a fixed cost per call that full batches spread; ONNX Runtime's
dynamic int8 gains nothing from pools, and its per-call scales make a row's result move with its batch-mates
(measured: docs/results.md, "An exit engine and a tokenising stage for GPUs" and "Early exit on the runtime
a CPU user picks"). `default_pooling` says which.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ee_model import encoders
from ee_model.heads import pool
from ee_model.outputs import EarlyExitBatch
from ee_model.policies import ExitPolicy, State
from ee_model.runtime import FP32, Runtime


@dataclass
class InputRows:
    """At most `batch_size` input rows: their indices in the output and their (right-padded) inputs."""

    rows: torch.Tensor  # (n,) int64
    input_ids: torch.Tensor  # (n, width)
    attention_mask: torch.Tensor  # (n, width)
    token_type_ids: torch.Tensor | None = None


@dataclass
class Waiting:
    """Rows waiting for a layer: indices, hidden states after the previous layer, mask, policy state."""

    rows: torch.Tensor  # (n,)
    hidden: torch.Tensor  # (n, width, hidden)
    mask: torch.Tensor  # (n, width)
    state: State

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, n: int) -> tuple[Waiting, Waiting]:
        head = Waiting(
            self.rows[:n], self.hidden[:n], self.mask[:n], {k: v[:n] for k, v in self.state.items()}
        )
        tail = Waiting(
            self.rows[n:], self.hidden[n:], self.mask[n:], {k: v[n:] for k, v in self.state.items()}
        )
        return head, tail

    @staticmethod
    def join(parts: list[Waiting]) -> Waiting:
        if len(parts) == 1:
            return parts[0]
        width = max(p.mask.shape[1] for p in parts)  # pad narrower parts on the right; padding is masked
        return Waiting(
            torch.cat([p.rows for p in parts]),
            torch.cat([F.pad(p.hidden, (0, 0, 0, width - p.hidden.shape[1])) for p in parts]),
            torch.cat([F.pad(p.mask, (0, width - p.mask.shape[1])) for p in parts]),
            {k: torch.cat([p.state[k] for p in parts]) for k in parts[0].state},
        )


class LayerPool:
    """First in, first out queue of waiting rows for one layer; its size is known on the host."""

    def __init__(self) -> None:
        self.parts: deque[Waiting] = deque()
        self.size = 0

    def put(self, waiting: Waiting, n: int) -> None:
        self.parts.append(waiting)
        self.size += n

    def take(self, n: int) -> Waiting:
        taken, count = [], 0
        while count < n and self.parts:
            part = self.parts.popleft()
            if count + len(part) > n:
                part, rest = part.split(n - count)
                self.parts.appendleft(rest)
            taken.append(part)
            count += len(part)
        self.size -= count
        return Waiting.join(taken)


class ExitEngine:
    """Runs the model's layers and heads on rows fed by `inputs`, under `policy`, `batch_size` rows a step."""

    def __init__(
        self,
        model: nn.Module,
        policy: ExitPolicy,
        batch_size: int,
        right_padded: bool = True,
        pool_across_batches: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        self.model = model
        self.policy = policy
        self.batch_size = batch_size
        self.right_padded = right_padded  # trailing padding columns may be trimmed
        self.pool_across_batches = pool_across_batches  # False: per-batch compaction

    def run(self, n_rows: int, inputs: Iterator[InputRows], device: torch.device) -> EarlyExitBatch:
        """Every row's exit logits, exit layer and tokens, indexed by the `rows` the inputs carry."""
        model, n_layers = self.model, self.model.n_layers
        self.logits = torch.empty(n_rows, model.config.num_labels, device=device)
        self.exit_layer = torch.empty(n_rows, dtype=torch.long, device=device)
        self.tokens = torch.empty(n_rows, dtype=torch.long, device=device)
        self.state = self.policy.init_state(n_rows, device)  # indexed by row, gathered when a row enters
        pools = [LayerPool() for _ in range(n_layers)]  # pools[i] waits for layer i (0-based); 0 is unused
        pending = iter(inputs)
        spent = False
        while not self.pool_across_batches:  # drain each input batch before the next enters
            waiting = next((i for i in range(1, n_layers) if pools[i].size), None)
            if waiting is not None:
                self._step(waiting, pools[waiting].take(self.batch_size), pools)
                continue
            batch = next(pending, None)
            if batch is None:
                break
            self._step(0, self._enter(batch), pools)
        while self.pool_across_batches:
            deep = next((i for i in range(n_layers - 1, 0, -1) if pools[i].size >= self.batch_size), None)
            if deep is not None:
                self._step(deep, pools[deep].take(self.batch_size), pools)
                continue
            if not spent:
                batch = next(pending, None)
                if batch is not None:
                    self._step(0, self._enter(batch), pools)
                    continue
                spent = True
            shallow = next((i for i in range(1, n_layers) if pools[i].size), None)
            if shallow is None:
                break
            self._step(shallow, pools[shallow].take(self.batch_size), pools)
        return EarlyExitBatch(logits=self.logits, exit_layer=self.exit_layer, tokens=self.tokens)

    def _enter(self, batch: InputRows) -> Waiting:
        encoder = self.model.encoder
        self.tokens[batch.rows] = batch.attention_mask.sum(dim=1)
        hidden = encoders.embed(encoder, batch.input_ids, batch.token_type_ids, batch.attention_mask)
        state = {k: v[batch.rows] for k, v in self.state.items()}
        return Waiting(batch.rows, hidden, batch.attention_mask, state)

    def _step(self, index: int, waiting: Waiting, pools: list[LayerPool]) -> None:
        model = self.model
        mask = waiting.mask
        exported = model.runtime.builds_layers
        inputs = encoders.LayerInputs(model.encoder, waiting.hidden, mask, exported).for_layer(index)
        hidden = encoders.run_layer(model.layers[index], waiting.hidden, inputs)
        seen = model.head_input(index, hidden)
        logits = model.heads[index](pool(seen, mask, model.config.pooling)).float()  # (n, N)
        rows = waiting.rows
        if index == model.n_layers - 1:  # the teacher: every row leaves
            self.logits[rows] = logits
            self.exit_layer[rows] = index + 1
            return
        leave, state = self.policy.step(logits, waiting.state)
        # The one device->host read of the step: how many rows leave, and the widest row that stays.
        widths = mask.sum(dim=1).masked_fill(leave, 0)
        n_leave, width = (int(v) for v in torch.stack([leave.sum(), widths.max()]).tolist())
        n_keep = len(rows) - n_leave
        if n_leave:
            order = torch.argsort(leave.to(torch.uint8), stable=True)  # staying rows first, in their order
            gone = order[n_keep:]
            self.logits[rows[gone]] = logits[gone]
            self.exit_layer[rows[gone]] = index + 1
            if n_keep == 0:
                return
            stay = order[:n_keep]
            rows, hidden, mask = rows[stay], hidden[stay], mask[stay]
            state = {name: value[stay] for name, value in state.items()}
        if self.right_padded:
            hidden, mask = hidden[:, :width], mask[:, :width]
        pools[index + 1].put(Waiting(rows, hidden, mask, state), n_keep)


def default_pooling(device: torch.device, runtime: Runtime = FP32) -> bool:
    """Pool rows across input batches on accelerators and, on CPUs, for layers that pay a fixed cost per call
    (`Runtime.pays_per_call`: bf16, OpenVINO); compact per batch otherwise (see the module's note)."""
    return torch.device(device).type != "cpu" or runtime.pays_per_call


def sorted_input_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    batch_size: int,
    right_padded: bool,
) -> Iterator[InputRows]:
    """Padded inputs fed longest first, `batch_size` rows at a time, each trimmed to its longest row."""
    lengths = attention_mask.sum(dim=1)
    order = torch.argsort(-lengths, stable=True)
    widths = lengths[order].tolist()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = widths[start] if right_padded else input_ids.shape[1]
        yield InputRows(
            rows,
            input_ids[rows, :width],
            attention_mask[rows, :width],
            None if token_type_ids is None else token_type_ids[rows, :width],
        )
