"""EarlyExitClassifier: a Hugging Face encoder with one exit head after every transformer layer."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from ee_model import encoders, io
from ee_model.config import EarlyExitConfig
from ee_model.flops import FlopsModel
from ee_model.heads import build_head, pool
from ee_model.layer_pools import ExitEngine, InputRows, default_pooling, sorted_input_rows
from ee_model.outputs import EarlyExitBatch, ExitLogits, Prediction
from ee_model.policies import ExitPolicy, ExitSetting
from ee_model.runtime import FP32
from ee_model.texts import describe_invalid, invalid_text_reasons
from ee_model.tokens import TextTokenizer, TokenIds


class EarlyExitClassifier(nn.Module):
    """Encoder + exit heads. Students sit after layers 1..L-1, the teacher (final classifier) after layer L.

    Build with `from_encoder` (pretrained weights) or `from_encoder_config` (random init), reload with
    `from_pretrained`. `forward` returns every exit's logits for training; `early_exit` and `predict` run
    per-row early exit at any batch size.
    """

    def __init__(self, config: EarlyExitConfig, encoder: PreTrainedModel, tokenizer: Any = None) -> None:
        super().__init__()
        encoders.check_supported(encoder.config.model_type, encoder.config)
        encoders.drop_unused_pooler(encoder)
        self.config = config.replace(encoder_config=json.loads(encoder.config.to_json_string()))
        self.encoder = encoder
        self.tokenizer = tokenizer
        if tokenizer is not None:
            tokenizer.padding_side = "right"  # early_exit trims trailing padding columns
        self.flops_model = FlopsModel.from_encoder_config(
            encoder.config, config.head_type, config.num_labels, config.student_heads
        )
        encoders.check_head_norm(encoder.config.model_type, config.head_norm)
        self.heads = self._build_heads()
        risk = self.config.exit_risk
        if risk is not None and risk.n_students != self.n_layers - 1:
            raise ValueError(
                f"exit_risk has {risk.n_students} layers' coefficients for {self.n_layers - 1} student layers"
            )
        self.stage2_frozen = False  # set by freeze_for_stage2; keeps frozen parts in eval mode
        self.runtime = FP32  # what runs the transformer layers (runtime_layers.with_runtime swaps them)
        self.layers_folder: Path | None = None  # the built layer files a runtime runs (int8, OpenVINO)

    def _build_heads(self) -> nn.ModuleList:
        """Every layer's exit head, students then the teacher, drawn from the global random stream. Students
        of a type of their own (`student_head_type`) are drawn from a fork of it, in place of students of the
        teacher's type, so the teacher and what follows (stage 1's dropout and order) draw the same numbers
        as in a model of one head type: MLP students change the students only."""
        config = self.config

        def heads(indices: range, head_type: str) -> list[nn.Module]:
            return [
                build_head(
                    head_type,
                    self.flops_model.hidden_size,
                    config.num_labels,
                    config.head_dropout,
                    self._own_norm() if self.has_own_norm(index) else None,
                )
                for index in indices
            ]

        students = heads(range(self.n_layers - 1), config.head_type)
        teacher = heads(range(self.n_layers - 1, self.n_layers), config.head_type)
        if config.student_heads != config.head_type:
            with torch.random.fork_rng(devices=[]):
                students = heads(range(self.n_layers - 1), config.student_heads)
        return nn.ModuleList([*students, *teacher])

    def _own_norm(self) -> nn.Module:
        """A student's own norm (head_norm="own"): a copy of the final norm, trained with the head."""
        return copy.deepcopy(encoders.final_norm(self.encoder)).requires_grad_(True)

    def has_own_norm(self, index: int) -> bool:
        """Whether layer `index`'s head normalises its pooled vector itself: the students with head_norm="own"
        (the teacher always reads through the encoder's final norm, as the model's own classifier does)."""
        return self.config.head_norm == "own" and index < self.n_layers - 1

    def head_input(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """What layer `index`'s head pools from the layer's output `hidden`: through the encoder's final norm
        (`encoders.head_input`) unless the head normalises the pooled vector itself (`has_own_norm`)."""
        if self.has_own_norm(index):
            return hidden
        return encoders.head_input(self.encoder, hidden)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_encoder(
        cls, name_or_path: str, labels: Sequence[str], revision: str | None = None, **options: Any
    ) -> EarlyExitClassifier:
        """Pretrained encoder (hub id or local path) + freshly initialised exit heads.

        Args:
            name_or_path: Hugging Face model id or local directory with config, weights and tokenizer.
            labels: class names.
            revision: hub revision, recorded in the config.
            **options: other `EarlyExitConfig` fields (head_type, pooling, variant, threshold, ...).
        """
        encoder_config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
        encoders.check_supported(encoder_config.model_type, encoder_config)  # before loading any weights
        config = EarlyExitConfig(
            encoder_name_or_path=str(name_or_path), labels=tuple(labels), encoder_revision=revision, **options
        )
        encoders.check_head_norm(encoder_config.model_type, config.head_norm)
        encoder = AutoModel.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
        return cls(config, encoder, tokenizer)

    @classmethod
    def from_encoder_config(
        cls, encoder_config: Any, labels: Sequence[str], tokenizer: Any, **options: Any
    ) -> EarlyExitClassifier:
        """Randomly initialised encoder built from a `PretrainedConfig` (tests, from-scratch training)."""
        encoders.check_supported(encoder_config.model_type, encoder_config)
        config = EarlyExitConfig(encoder_name_or_path="<from-config>", labels=tuple(labels), **options)
        return cls(config, AutoModel.from_config(encoder_config), tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> EarlyExitClassifier:
        """Load a directory written by `save_pretrained` onto CPU (no hub access, no pickle). The modules are
        built without initialising their weights (every one is then loaded, strictly), which was most of a
        load's time (docs/results.md, "Measurements the code refers to")."""
        from transformers.initialization import no_init_weights

        config = EarlyExitConfig.load(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
        with no_init_weights():
            model = cls(config, AutoModel.from_config(config.pretrained_encoder_config()), tokenizer)
        io.load_weights(model, directory)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write safetensors weights, `ee_config.json` and the tokenizer to `directory`."""
        if self.runtime != FP32:
            raise ValueError(
                f"this model runs {self.runtime.name} layers; save the fp32 model they came from"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        io.save_weights(self, directory)
        self.config.save(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))
        return directory

    # ---- structure ----------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return encoders.encoder_layers(self.encoder)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def teacher(self) -> nn.Module:
        return self.heads[-1]

    def freeze_for_stage2(self) -> None:
        """Stage 2 of the KL variant: backbone and teacher frozen (no gradients, eval mode); students
        train."""
        self.stage2_frozen = True
        self.encoder.requires_grad_(False)
        self.teacher.requires_grad_(False)
        for head in self.heads[:-1]:
            head.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> EarlyExitClassifier:
        super().train(mode)
        if mode and self.stage2_frozen:
            # frozen parts stay in eval mode (dropout off) while the students train
            self.encoder.eval()
            self.teacher.eval()
        return self

    # ---- training forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        train_encoder: bool | None = None,
        student_features: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> ExitLogits:
        """Every exit's logits (n_layers, batch, num_labels). train_encoder=False runs the backbone without
        autograd (stage 2: one backbone pass feeds every student, no activation memory kept); None: False
        after `freeze_for_stage2`, else True.

        Stage 2 from cached features: instead of token ids, `student_features` (n_layers - 1, batch, hidden),
        what `pooled_features` gave for the students' layers, and the frozen teacher's `teacher_logits`
        (batch, num_labels); only the student heads run, and the result is what the text path gives.
        """
        if student_features is not None:
            if teacher_logits is None or input_ids is not None:
                raise ValueError("give student_features with teacher_logits, and no token ids")
            students = [head(p) for head, p in zip(self.heads[:-1], student_features, strict=True)]
            return ExitLogits(logits=torch.stack([*students, teacher_logits.to(students[0].dtype)]))
        if train_encoder is None:
            train_encoder = not self.stage2_frozen
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            pooled = self.pooled_features(input_ids, attention_mask, token_type_ids)
        logits = torch.stack([head(p) for head, p in zip(self.heads, pooled, strict=True)])  # (L, batch, N)
        return ExitLogits(logits=logits)

    def pooled_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What each exit head sees: every layer's pooled hidden state, (n_layers, batch, hidden)."""
        encoder = self.encoder
        hidden = encoders.embed(encoder, input_ids, token_type_ids, attention_mask)  # (batch, seq, hidden)
        inputs = encoders.LayerInputs(encoder, hidden, attention_mask, self.runtime.builds_layers)
        pooled = []
        for index, layer in enumerate(self.layers):
            hidden = encoders.run_layer(layer, hidden, inputs.for_layer(index))  # (batch, seq, hidden)
            seen = self.head_input(index, hidden)
            pooled.append(pool(seen, attention_mask, self.config.pooling))  # (batch, hidden)
        return torch.stack(pooled)

    # ---- per-row early exit -------------------------------------------------------------------------
    @torch.inference_mode()
    def early_exit(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        policy: ExitPolicy | ExitSetting,
        token_type_ids: torch.Tensor | None = None,
        batch_size: int | None = None,
        layer_pools: bool | None = None,
    ) -> EarlyExitBatch:
        """Per-row early exit of padded inputs; rows are returned in input order.

        Rows enter sorted by length, `batch_size` at a time (default: all at once). With `layer_pools`
        (default on accelerators and for reduced-precision layers, `ee_model.layer_pools.default_pooling`)
        every step runs one layer on `batch_size` rows waiting for it, taken across input batches; without,
        each batch runs layer by layer and the rows the policy lets out leave it (per-batch compaction).
        Remaining rows carry their policy state with them; padding columns no remaining row needs are trimmed
        (right padding).
        """
        n_rows = input_ids.shape[0]
        batch_size = batch_size or max(n_rows, 1)
        right_padded = bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all())
        inputs = sorted_input_rows(input_ids, attention_mask, token_type_ids, batch_size, right_padded)
        return self._run_engine(policy, n_rows, inputs, batch_size, layer_pools, right_padded)

    @torch.inference_mode()
    def early_exit_ids(
        self,
        token_ids: TokenIds,
        policy: ExitPolicy | ExitSetting,
        batch_size: int,
        layer_pools: bool | None = None,
    ) -> EarlyExitBatch:
        """`early_exit` of unpadded token ids (rows in input order): rows are sorted by length and padded
        `batch_size` at a time as they enter, so memory follows `batch_size`, not the number of rows."""
        order = np.argsort(-token_ids.lengths, kind="stable")  # longest first: steps of similar length
        device = self.device
        pad_id = self.text_tokenizer.pad_id

        def inputs() -> Iterator[InputRows]:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                ids, mask = token_ids.take(rows).padded(pad_id, device)
                yield InputRows(torch.from_numpy(rows).to(device), ids, mask)

        return self._run_engine(policy, len(token_ids), inputs(), batch_size, layer_pools)

    def _run_engine(
        self,
        policy: ExitPolicy | ExitSetting,
        n_rows: int,
        inputs: Iterator[InputRows],
        batch_size: int,
        layer_pools: bool | None,
        right_padded: bool = True,
    ) -> EarlyExitBatch:
        """The exit engine over `inputs` (sorted by length); `layer_pools` None: the device's default. The
        engine checks `batch_size`."""
        if isinstance(policy, ExitSetting):
            policy = self.exit_policy(policy)
        pooling = default_pooling(self.device, self.runtime) if layer_pools is None else layer_pools
        engine = ExitEngine(self, policy, batch_size, right_padded, pool_across_batches=pooling)
        return engine.run(n_rows, inputs, self.device)

    def exit_policy(self, setting: ExitSetting) -> ExitPolicy:
        """The policy that runs `setting` on this model (the "risk" policy reads the model's fitted
        `config.exit_risk`)."""
        return setting.exit_policy(self.config.exit_risk)

    @property
    def text_tokenizer(self) -> TextTokenizer:
        """Texts -> unpadded `TokenIds`, truncated to `config.max_length` (ee_model.tokens' fast path)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass one to the constructor or use from_encoder")
        cached = self.__dict__.get("_text_tokenizer")
        if (
            cached is None
            or cached.tokenizer is not self.tokenizer
            or cached.max_length != self.config.max_length
        ):
            cached = self.__dict__["_text_tokenizer"] = TextTokenizer(self.tokenizer, self.config.max_length)
        return cached

    def tokenize(self, texts: Sequence[str]) -> TokenIds:
        """Unpadded token ids of each text with the model's special tokens, truncated to
        `config.max_length`: the one tokenisation of training, evaluation, `predict` and batch scoring."""
        return self.text_tokenizer(texts)

    def encode(self, texts: Sequence[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The model's inputs for `texts`: `tokenize`, right-padded to the longest, as tensors on `device`
        (default the model's). Single texts need no token_type_ids (all zero; the encoders default to it)."""
        input_ids, attention_mask = self.tokenize([str(t) for t in texts]).padded(
            self.text_tokenizer.pad_id, device or self.device
        )
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def predict(
        self,
        texts: Sequence[Any],
        policy: str | None = None,
        threshold: float | None = None,
        patience: int | None = None,
        batch_size: int = 32,
        risk: float | None = None,
        invalid: str = "raise",
        setting: ExitSetting | None = None,
        layer_pools: bool | None = None,
    ) -> Prediction:
        """Tokenise and classify texts with per-row early exit; results in input order.

        Args:
            texts: list of strings.
            policy: "entropy", "risk", "count", "patience" or "none"; default the model's stored policy.
            threshold: S for "entropy" (normalised entropy); default the stored one.
            patience: t for "count"/"patience"; default the stored one.
            batch_size: rows per forward; rows are sorted by length inside to cut padding.
            risk: r for "risk" (estimated risk of a changed prediction, `ee_model.exit_risk`); default the
                stored one.
            invalid: "raise" -> ValueError naming null/empty/non-string rows; "null" -> those rows get a
                defined empty result with the reason in `error`.
            setting: an `ExitSetting` instead of policy / threshold / patience.
            layer_pools: pool rows across batches of `batch_size` (see `early_exit`); default on accelerators.
        Returns:
            Prediction with label, probs, confidence, exit_layer, flops, tokens and error per row.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        if invalid not in ("raise", "null"):
            raise ValueError(f"invalid={invalid!r} is not one of ['raise', 'null']")
        reasons = invalid_text_reasons(texts)
        if invalid == "raise" and any(reasons):
            raise ValueError(describe_invalid(reasons))
        if setting is not None and (policy, threshold, patience, risk) != (None, None, None, None):
            raise ValueError("give an ExitSetting or policy / threshold / patience / risk, not both")
        exit_policy = self.exit_policy(setting or self.config.setting(policy, threshold, patience, risk))
        valid = [i for i, reason in enumerate(reasons) if reason is None]
        return self._predict(
            self.tokenize([texts[i] for i in valid]), reasons, exit_policy, batch_size, layer_pools
        )

    def predict_tokens(
        self,
        token_ids: TokenIds,
        errors: Sequence[str | None] | None = None,
        setting: ExitSetting | None = None,
        batch_size: int = 32,
        layer_pools: bool | None = None,
    ) -> Prediction:
        """`predict` from token ids made by `tokenize` (in another process, e.g. a tokenising stage).

        Args:
            token_ids: the scoreable rows, in order.
            errors: one entry per row of the result: None for a scoreable row (the next row of
                `token_ids`), else the reason it cannot be scored (it gets the defined empty result).
                Default: every row scoreable.
            setting: the exit setting; default the model's stored one.
            batch_size: rows per layer step.
            layer_pools: as in `predict`.
        """
        reasons = list(errors) if errors is not None else [None] * len(token_ids)
        if sum(r is None for r in reasons) != len(token_ids):
            raise ValueError(
                f"{len(token_ids)} rows of token ids for {sum(r is None for r in reasons)} scoreable rows"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        policy = self.exit_policy(setting or self.config.setting())
        return self._predict(token_ids, reasons, policy, batch_size, layer_pools)

    def _predict(
        self,
        token_ids: TokenIds,
        reasons: list[str | None],
        policy: ExitPolicy,
        batch_size: int,
        layer_pools: bool | None,
    ) -> Prediction:
        result = self._empty_prediction(len(reasons), reasons)
        if len(token_ids):
            was_training = self.training
            self.eval()
            try:
                out = self.early_exit_ids(token_ids, policy, batch_size, layer_pools)
            finally:
                self.train(was_training)
            positions = np.array([i for i, reason in enumerate(reasons) if reason is None])
            self._fill(result, positions, out)
        return result

    def _empty_prediction(self, n: int, reasons: list[str | None]) -> Prediction:
        return Prediction(
            label=[None] * n,
            label_id=np.full(n, -1, dtype=np.int64),
            probs=np.full((n, self.config.num_labels), np.nan, dtype=np.float32),
            confidence=np.full(n, np.nan, dtype=np.float32),
            exit_layer=np.zeros(n, dtype=np.int64),
            flops=np.zeros(n, dtype=np.int64),
            tokens=np.zeros(n, dtype=np.int64),
            error=list(reasons),
        )

    def _fill(self, result: Prediction, positions: np.ndarray, out: EarlyExitBatch) -> None:
        probs = torch.softmax(out.logits, dim=-1).cpu().numpy()  # (batch, N)
        label_id = probs.argmax(axis=1)
        tokens = out.tokens.cpu().numpy()
        exit_layer = out.exit_layer.cpu().numpy()
        result.probs[positions] = probs
        result.label_id[positions] = label_id
        result.confidence[positions] = probs.max(axis=1)
        result.exit_layer[positions] = exit_layer
        result.tokens[positions] = tokens
        result.flops[positions] = self.flops_model.row_flops(tokens.astype(np.int64), exit_layer)
        for position, label in zip(positions, label_id, strict=True):
            result.label[position] = self.config.labels[label]
