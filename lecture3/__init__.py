"""lecture3: which transformer architecture choices matter, and why.

    import lecture3
    cfg = lecture3.Config().replace(**{"model.norm_position": "post", "train.steps": 50})
    run = lecture3.train(cfg)                          # in memory; workdir=... checkpoints and resumes
    run.history.to_list()                              # every logged record
    lecture3.evaluate(cfg, run.params, batches)        # {"loss", "perplexity", "tokens"}

    from lecture3 import ModelConfig, Transformer, presets, hf, accounting
    cfg = presets.get("llama3", size="tiny")
    params = lecture3.init_params(cfg, 0)
    logits = Transformer(cfg).apply({"params": params}, tokens).logits  # int32[B, T] -> float32[B, T, V]
    out = Transformer(cfg).apply({"params": params}, tokens, capture=("attn_probs", "resid_rms"))
"""

import importlib

# The jax-free part of the API is imported here; everything else on first use (PEP 562), so that
# `import lecture3.config` or `lecture3 data --help` does not load jax. `grid` must be bound here:
# importing the submodule lecture3.grid would otherwise leave the module under that name.
from lecture3.config import Config, DistConfig, MeshConfig, ModelConfig, RopeScaling, TrainConfig
from lecture3.errors import Lecture3Error
from lecture3.grid import config_diff, grid, run_name

_LAZY: dict[str, tuple[str, str | None]] = {  # name -> (module, attribute; None: the module itself)
    **{m: (f"lecture3.{m}", None) for m in ("accounting", "capture", "diagnostics", "hf", "losses", "optim",
                                            "population", "presets", "runtime")},
    "generate": ("lecture3.decoding", "generate"),
    **{n: ("lecture3.loop", n) for n in ("History", "Run", "evaluate", "init_params", "load_run", "train")},
    **{n: ("lecture3.model", n) for n in ("Output", "Transformer")},
}

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
    "population",
    "presets",
    "run_name",
    "runtime",
    "train",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lecture3' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # later look-ups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
