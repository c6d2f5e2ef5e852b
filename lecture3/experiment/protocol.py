"""The shared protocol of `experiments/` as code: the baseline models S and M, the training recipe,
the seeds, the LR grid, and the scales a grid runs at.

  data       the embedded `stdlib` corpus, tokenizer bpe:2048, T = 128 unless a claim says otherwise;
             validation: the whole validation split tiled into rows (the same rows for every run), nats/token
  S          d_model 128, 4 layers, 4 heads (head_dim 32), SwiGLU with the default 8/3 d_ff, RoPE
             (theta 10k), pre-RMSNorm, no biases, tied embeddings, no dropout, float32
  M          S with d_model 64 (4 heads of 16), for the wide LR grids
  training   AdamW (0.9, 0.95, eps 1e-8), clip 1.0, weight decay 0.1, linear warmup over 5% of the steps
             then cosine to 10% of the peak, batch 16 x 128, `STEPS` = 600 steps (1.2M tokens) unless a claim
             states otherwise
  seeds      4 per configuration (paired by seed); a seed sets init, data order and dropout (train.seed = data.seed)

A scale multiplies the same grids: `cpu` is the protocol as written; `gpu` widens the models about 3x
in d_model (about 10x the parameters) and keeps every other choice. `quick` (the tests' mode) shrinks
any config to a few steps of a tiny batch, so every claim's code path runs in seconds; it never gives
a verdict.

"The baseline's best LR" (claims 5, 6, 13, 15) is S's best LR over `LRS`, as the shared runs of claims 3
and 4 (`baseline_specs`, the same configs, so the same records) find it: `baseline_best_lr(scale)` reads
it from the pool of records, None until all of them are recorded.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from pathlib import Path

from lecture3.config import Config, DataConfig, ModelConfig, TrainConfig
from lecture3.experiment import records, stats
from lecture3.experiment.spec import RunSpec

SEEDS = (0, 1, 2, 3)  # protocol v2: 4 seeds, comparisons paired by seed
LRS = (1e-3, 3e-3, 1e-2)  # the protocol's 3-point grid for "best LR"
STEPS = 600  # 600 x 16 x 128 = 1.2M tokens per run
BATCH = 16
SEQ_LEN = 128
# The whole validation split tiled into rows: it holds about 1,700 rows of 128 at bpe:2048, and
# `validation_batches` takes all of them when val_sequences allows (the last batch padded, masked out).
VAL_ROWS = 4096
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
SCALES = ("cpu", "gpu")
RESULTS = records.REPO / "experiments" / "results"  # reports per claim; the shared pool of records in runs/
POOL = "runs"  # the folder of RESULTS (or of --results-dir) that holds every claim's run records
GPU_WIDTH = 3  # d_model x3: about 10x the non-embedding parameters


def model_s(**changes) -> ModelConfig:
    base = ModelConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, activation="swiglu",
                       position="rope", rope_theta=10_000.0, norm="rmsnorm", norm_position="pre",
                       qkv_bias=False, attn_out_bias=False, mlp_bias=False, norm_bias=False,
                       tie_embeddings=True, max_seq_len=512, dtype="float32")
    return dataclasses.replace(base, **changes)


def model_m(**changes) -> ModelConfig:
    return model_s(**{"d_model": 64, **changes})


def config(model: ModelConfig, *, lr: float, seed: int, steps: int = STEPS, seq_len: int = SEQ_LEN,
           warmup: float = WARMUP_FRACTION, scale: str = "cpu", **train) -> Config:
    """A run of the protocol: `model` trained at peak `lr` with `seed`; `train` overrides TrainConfig
    fields (e.g. weight_decay=0.0, which is `None`: off; z_loss=1e-4; final_lr=0.0)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: expected one of {SCALES}")
    if scale == "gpu":
        model = _widen(model, GPU_WIDTH)
    tcfg = TrainConfig(
        steps=steps, batch_size=BATCH, lr=lr, final_lr=train.pop("final_lr", FINAL_LR_FRACTION * lr),
        warmup_steps=int(round(warmup * steps)), schedule="cosine", beta1=0.9, beta2=0.95, eps=1e-8,
        weight_decay=train.pop("weight_decay", 0.1) or None, grad_clip=1.0, seed=seed,
        log_every=train.pop("log_every", 10), eval_every=train.pop("eval_every", steps),
        eval_batches=VAL_ROWS // BATCH, checkpoint_every=steps, sample_tokens=0, progress=False,
        on_nonfinite="stop", **train)
    data = DataConfig(source="stdlib", tokenizer="bpe:2048", seq_len=seq_len, seed=seed,
                      val_sequences=VAL_ROWS)
    return Config(model=model, data=data, train=tcfg)


def _widen(model: ModelConfig, k: int) -> ModelConfig:
    changes = {"d_model": model.d_model * k}
    if model.head_dim is not None:
        changes["head_dim"] = model.head_dim * k
    if model.d_ff is not None:
        changes["d_ff"] = model.d_ff * k
    return dataclasses.replace(model, **changes)


def quick(cfg: Config) -> Config:
    """The tests' shrink of any run: at most 2 layers (or one repeat of the layer pattern), 3 steps of
    8 x 32 byte tokens, 8 validation rows."""
    t = cfg.train
    seq = min(32, cfg.data.seq_len)
    data = dataclasses.replace(cfg.data, tokenizer="bytes", seq_len=seq, val_sequences=8)
    k = len(cfg.model.layer_pattern)
    layers = min(cfg.model.n_layers, 2)
    if layers % k:  # a layer pattern (e.g. 3 local : 1 global) keeps one whole repeat
        layers = k
    model = dataclasses.replace(cfg.model, vocab_size=259, n_layers=layers)
    # a batch of 8 splits over the 8 CPU devices the tests simulate
    train = dataclasses.replace(t, steps=3, batch_size=8, warmup_steps=min(t.warmup_steps, 1), log_every=1,
                                eval_every=3, eval_batches=1, checkpoint_every=3)
    return Config(model=model, data=data, train=train, mesh=cfg.mesh, dist=cfg.dist)


def baseline_specs(scale: str = "cpu") -> list[RunSpec]:
    """Model S over `LRS` x `SEEDS`, tagged arm "baseline": the runs claims 3 and 4 share (their grids
    hold these exact configs) and from which `baseline_best_lr` is read."""
    return [RunSpec(config(model_s(), lr=lr, seed=seed, scale=scale), tags={"arm": "baseline", "lr": lr, "seed": seed})
            for lr in LRS for seed in SEEDS]


# (pool folder or None for RESULTS/POOL, quick): set by the runner while it builds a grid
_GRID = contextvars.ContextVar("lecture3_experiment_grid", default=(None, False))


@contextlib.contextmanager
def building(pool: Path | None = None, quick: bool = False):
    """While a grid is built: `baseline_best_lr` reads `pool` (None: the repository's), and in quick mode
    answers `LRS[0]` (a quick grid never waits for the baseline)."""
    token = _GRID.set((pool, quick))
    try:
        yield
    finally:
        _GRID.reset(token)


def baseline_best_lr(scale: str = "cpu") -> float | None:
    """S's best LR over `LRS` (the lowest mean final loss of `baseline_specs`), from the pool of records;
    None until all of them are recorded."""
    pool, quick = _GRID.get()
    if quick:
        return LRS[0]
    folder = Path(pool) if pool is not None else RESULTS / POOL
    by_lr: dict[float, list[float]] = {}
    for spec in baseline_specs(scale):
        path = folder / f"{spec.key}.json"
        if not path.is_file():
            return None
        by_lr.setdefault(spec.tags["lr"], []).append(json.loads(path.read_text())["result"]["final_loss"])
    return stats.best_lr(by_lr)
