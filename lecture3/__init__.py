"""lecture3: which transformer architecture choices matter, and why.

    import lecture3
    cfg = lecture3.Config().replace(**{"model.norm_position": "post", "train.steps": 50})
    run = lecture3.train(cfg)                          # in memory; workdir=... checkpoints and resumes
    run.history.to_list()                              # every logged record
    lecture3.evaluate(cfg, run.params, batches)        # {"loss", "perplexity", "tokens"}

    from lecture3 import ModelConfig, Transformer, presets, hf, accounting
    cfg = presets.get("llama3", size="tiny")
    params = lecture3.init_params(cfg, 0)
    logits = Transformer(cfg).apply({"params": params}, tokens)   # int32[B, T] -> float32[B, T, V]
    out = Transformer(cfg).apply({"params": params}, tokens, capture=("attn_probs", "resid_rms"))
"""

from lecture3 import accounting, capture, diagnostics, hf, losses, optim, presets
from lecture3.config import Config, DistConfig, MeshConfig, ModelConfig, RopeScaling, TrainConfig
from lecture3.decoding import generate
from lecture3.errors import Lecture3Error
from lecture3.grid import config_diff, grid, run_name
from lecture3.loop import History, Run, evaluate, init_params, load_run, train
from lecture3.model import Output, Transformer

__all__ = [
    "Config",
    "DistConfig",
    "History",
    "Lecture3Error",
    "MeshConfig",
    "ModelConfig",
    "Output",
    "RopeScaling",
    "Run",
    "TrainConfig",
    "Transformer",
    "accounting",
    "capture",
    "config_diff",
    "diagnostics",
    "evaluate",
    "generate",
    "grid",
    "hf",
    "init_params",
    "load_run",
    "losses",
    "optim",
    "presets",
    "run_name",
    "train",
]
