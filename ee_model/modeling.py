"""EarlyExitClassifier: a Hugging Face encoder with one exit head after every transformer layer."""

from __future__ import annotations

import json
from collections.abc import Sequence
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
from ee_model.outputs import EarlyExitBatch, ExitLogits, Prediction
from ee_model.policies import ExitPolicy, ExitSetting
from ee_model.texts import describe_invalid, invalid_text_reasons


class EarlyExitClassifier(nn.Module):
    """Encoder + exit heads. Students sit after layers 1..L-1, the teacher (final classifier) after layer L.

    Build with `from_encoder` (pretrained weights) or `from_encoder_config` (random init), reload with
    `from_pretrained`. `forward` returns every exit's logits for training; `early_exit` and `predict` run
    per-row early exit at any batch size.
    """

    def __init__(self, config: EarlyExitConfig, encoder: PreTrainedModel, tokenizer: Any = None) -> None:
        super().__init__()
        encoders.check_supported(encoder.config.model_type)
        encoders.drop_unused_pooler(encoder)
        self.config = config.replace(encoder_config=json.loads(encoder.config.to_json_string()))
        self.encoder = encoder
        self.tokenizer = tokenizer
        if tokenizer is not None:
            tokenizer.padding_side = "right"  # early_exit trims trailing padding columns
        self.flops_model = FlopsModel.from_encoder_config(encoder.config, config.head_type, config.num_labels)
        self.heads = nn.ModuleList(
            build_head(config.head_type, self.flops_model.hidden_size, config.num_labels, config.head_dropout)
            for _ in range(self.n_layers)
        )
        self.stage2_frozen = False  # set by freeze_for_stage2; keeps frozen parts in eval mode

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
        encoders.check_supported(encoder_config.model_type)  # before loading any weights
        config = EarlyExitConfig(
            encoder_name_or_path=str(name_or_path), labels=tuple(labels), encoder_revision=revision, **options
        )
        encoder = AutoModel.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=False)
        return cls(config, encoder, tokenizer)

    @classmethod
    def from_encoder_config(
        cls, encoder_config: Any, labels: Sequence[str], tokenizer: Any, **options: Any
    ) -> EarlyExitClassifier:
        """Randomly initialised encoder built from a `PretrainedConfig` (tests, from-scratch training)."""
        encoders.check_supported(encoder_config.model_type)
        config = EarlyExitConfig(encoder_name_or_path="<from-config>", labels=tuple(labels), **options)
        return cls(config, AutoModel.from_config(encoder_config), tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> EarlyExitClassifier:
        """Load a directory written by `save_pretrained` onto CPU (no hub access, no pickle)."""
        config = EarlyExitConfig.load(directory)
        encoder = AutoModel.from_config(config.pretrained_encoder_config())
        model = cls(config, encoder, AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False))
        io.load_weights(model, directory)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write safetensors weights, `ee_config.json` and the tokenizer to `directory`."""
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
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        train_encoder: bool | None = None,
    ) -> ExitLogits:
        """Every exit's logits (n_layers, batch, num_labels). train_encoder=False runs the backbone without
        autograd (stage 2: one backbone pass feeds every student, no activation memory kept); None: False
        after `freeze_for_stage2`, else True."""
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
        hidden = encoders.embed(self.encoder, input_ids, token_type_ids)  # (batch, seq, hidden)
        mask = encoders.attention_mask_for(self.encoder, hidden, attention_mask)
        pooled = []
        for layer in self.layers:
            hidden = encoders.run_layer(layer, hidden, mask)  # (batch, seq, hidden)
            pooled.append(pool(hidden, attention_mask, self.config.pooling))  # (batch, hidden)
        return torch.stack(pooled)

    # ---- per-row early exit -------------------------------------------------------------------------
    @torch.inference_mode()
    def early_exit(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        policy: ExitPolicy | ExitSetting,
        token_type_ids: torch.Tensor | None = None,
    ) -> EarlyExitBatch:
        """Run layer by layer; after each student layer the rows the policy lets out leave the batch.

        Remaining rows carry their policy state with them; padding columns no remaining row needs are trimmed
        (right padding). Rows are returned in input order.
        """
        if isinstance(policy, ExitSetting):
            policy = policy.exit_policy()
        batch = input_ids.shape[0]
        tokens = attention_mask.sum(dim=1)  # (batch,)
        right_padded = bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all())
        out_logits = torch.empty(batch, self.config.num_labels, device=input_ids.device)
        exit_layer = torch.empty(batch, dtype=torch.long, device=input_ids.device)
        rows = torch.arange(batch, device=input_ids.device)  # original index of each remaining row
        mask = attention_mask
        hidden = encoders.embed(self.encoder, input_ids, token_type_ids)  # (batch, seq, hidden)
        state = policy.init_state(batch, input_ids.device)
        last = self.n_layers - 1
        for index, (layer, head) in enumerate(zip(self.layers, self.heads, strict=True)):
            hidden = encoders.run_layer(
                layer, hidden, encoders.attention_mask_for(self.encoder, hidden, mask)
            )
            logits = head(pool(hidden, mask, self.config.pooling)).float()  # (remaining, N)
            if index == last:
                out_logits[rows] = logits
                exit_layer[rows] = index + 1
                break
            leave, state = policy.step(logits, state)
            # One device->host read per layer (this is what costs on a GPU): how many rows leave, and the
            # widest remaining row. Everything else is index arithmetic on the device.
            widths = mask.sum(dim=1).masked_fill(leave, 0)
            n_leave, width = (int(v) for v in torch.stack([leave.sum(), widths.max()]).tolist())
            if n_leave == 0:
                continue
            n_keep = len(rows) - n_leave
            order = torch.argsort(leave.to(torch.uint8), stable=True)  # staying rows first, in their order
            gone = order[n_keep:]
            out_logits[rows[gone]] = logits[gone]
            exit_layer[rows[gone]] = index + 1
            if n_keep == 0:
                break
            stay = order[:n_keep]
            rows, hidden, mask = rows[stay], hidden[stay], mask[stay]
            state = {name: value[stay] for name, value in state.items()}
            if right_padded:
                hidden, mask = hidden[:, :width], mask[:, :width]
        return EarlyExitBatch(logits=out_logits, exit_layer=exit_layer, tokens=tokens)

    def tokenize(self, texts: Sequence[str]) -> dict[str, list[list[int]]]:
        """Unpadded token ids of each text, truncated to `config.max_length`."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass one to the constructor or use from_encoder")
        return self.tokenizer(list(texts), truncation=True, max_length=self.config.max_length, padding=False)

    def encode(self, texts: Sequence[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The model's inputs for `texts`: token ids truncated to `config.max_length`, right-padded to the
        longest, as tensors on `device` (default the model's). The one tokenisation of training, evaluation
        and `predict` (which tokenises first, sorts by length, then pads each call's rows with `_pad`)."""
        return self._pad(self.tokenize([str(t) for t in texts]), device)

    def predict(
        self,
        texts: Sequence[Any],
        policy: str | None = None,
        threshold: float | None = None,
        patience: int | None = None,
        batch_size: int = 32,
        invalid: str = "raise",
        setting: ExitSetting | None = None,
    ) -> Prediction:
        """Tokenise and classify texts with per-row early exit; results in input order.

        Args:
            texts: list of strings.
            policy: "entropy", "count", "patience" or "none"; default the model's stored policy.
            threshold: S for "entropy" (normalised entropy); default the stored one.
            patience: t for "count"/"patience"; default the stored one.
            batch_size: rows per forward; rows are sorted by length inside to cut padding.
            invalid: "raise" -> ValueError naming null/empty/non-string rows; "null" -> those rows get a
                defined empty result with the reason in `error`.
            setting: an `ExitSetting` instead of policy / threshold / patience.
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
        if setting is not None and (policy, threshold, patience) != (None, None, None):
            raise ValueError("give an ExitSetting or policy / threshold / patience, not both")
        exit_policy = (setting or self.config.setting(policy, threshold, patience)).exit_policy()
        valid = [i for i, reason in enumerate(reasons) if reason is None]
        result = self._empty_prediction(len(reasons), reasons)
        if valid:
            self._predict_valid([texts[i] for i in valid], np.asarray(valid), exit_policy, batch_size, result)
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

    def _predict_valid(
        self, texts: list[str], positions: np.ndarray, policy: ExitPolicy, batch_size: int, result: Prediction
    ) -> None:
        was_training = self.training
        self.eval()
        try:
            encoded = self.tokenize(texts)
            lengths = np.array([len(ids) for ids in encoded["input_ids"]])
            order = np.argsort(-lengths, kind="stable")  # longest first: batches of similar length
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = self._pad([{k: v[i] for k, v in encoded.items()} for i in chunk])
                out = self.early_exit(
                    batch["input_ids"], batch["attention_mask"], policy, batch.get("token_type_ids")
                )
                self._fill(result, positions[chunk], out)
        finally:
            self.train(was_training)

    def _pad(self, features: Any, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        padded = self.tokenizer.pad(features, padding="longest", return_tensors="pt")  # right: see __init__
        return {key: value.to(device or self.device) for key, value in padded.items()}

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
