"""lecture3: which transformer architecture choices matter, and why.

    from lecture3 import ModelConfig, Transformer, presets, hf, accounting
    cfg = presets.get("llama3", size="tiny")          # dataclasses.replace(cfg, ...) for variants
    params = Transformer(cfg).init(rng, tokens)["params"]
    logits = Transformer(cfg).apply({"params": params}, tokens)   # int32[B, T] -> float32[B, T, V]
"""

from lecture3 import accounting, hf, losses, optim, presets
from lecture3.config import Config, DistConfig, MeshConfig, ModelConfig, RopeScaling, TrainConfig
from lecture3.decoding import generate
from lecture3.model import Transformer

__all__ = [
    "Config",
    "DistConfig",
    "MeshConfig",
    "ModelConfig",
    "RopeScaling",
    "TrainConfig",
    "Transformer",
    "accounting",
    "generate",
    "hf",
    "losses",
    "optim",
    "presets",
]
