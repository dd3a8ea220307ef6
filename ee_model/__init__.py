"""Early-exit text classification on any Hugging Face encoder (plain PyTorch + transformers, no Ray)."""

from ee_model.config import EarlyExitConfig, ModelOptions
from ee_model.encoders import SUPPORTED_MODEL_TYPES
from ee_model.flops import FlopsModel, flops_speedup, layer_speedup
from ee_model.int8 import int8_layers, load_int8, with_int8_layers
from ee_model.layer_pools import ExitEngine
from ee_model.losses import joint_loss, stage1_loss, stage2_loss
from ee_model.modeling import EarlyExitClassifier
from ee_model.outputs import EarlyExitBatch, ExitLogits, Prediction
from ee_model.policies import (
    CountPolicy,
    EntropyPolicy,
    ExitPolicy,
    ExitRequest,
    ExitSetting,
    FullDepthPolicy,
    PatiencePolicy,
    RiskPolicy,
    exit_layers,
    make_policy,
)
from ee_model.runtime import Runtime, resolve_runtime
from ee_model.runtime_layers import load_model, with_runtime
from ee_model.signals import normalised_entropy
from ee_model.tokens import TextTokenizer, TokenIds

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CountPolicy",
    "EarlyExitBatch",
    "EarlyExitClassifier",
    "EarlyExitConfig",
    "EntropyPolicy",
    "ExitEngine",
    "ExitLogits",
    "ExitPolicy",
    "ExitRequest",
    "ExitSetting",
    "FlopsModel",
    "FullDepthPolicy",
    "PatiencePolicy",
    "RiskPolicy",
    "Runtime",
    "ModelOptions",
    "Prediction",
    "TextTokenizer",
    "TokenIds",
    "exit_layers",
    "flops_speedup",
    "int8_layers",
    "joint_loss",
    "layer_speedup",
    "load_int8",
    "load_model",
    "make_policy",
    "normalised_entropy",
    "resolve_runtime",
    "stage1_loss",
    "stage2_loss",
    "with_int8_layers",
    "with_runtime",
]
