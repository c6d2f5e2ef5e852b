"""lecture3: which transformer architecture choices matter, and why.

    from lecture3 import ModelConfig, Transformer, presets, hf, accounting
    cfg = presets.get("llama3", size="tiny")
    params = Transformer(cfg).init(rng, tokens)["params"]
    logits = Transformer(cfg).apply({"params": params}, tokens)
"""

from lecture3.config import ModelConfig, RopeScaling
from lecture3.model import Transformer

__all__ = ["ModelConfig", "RopeScaling", "Transformer"]
