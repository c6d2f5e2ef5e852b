"""One run of an experiment: train a config through `lecture3.train` and measure what every claim reads.

A training run's result holds
  final_val_loss   the validation loss at the last step (nats/token, the fixed validation set)
  final_loss       the same, or the initial loss ln V for a diverged run (the protocol never drops one)
  diverged, diverged_step   the loss became non-finite (step s), or the final loss ended above ln V
  initial_loss     ln V (the loss of a uniform prediction: the model at init)
  train_loss_tail  mean training loss over the logged steps of the last 5% of training
  history          every logged record (step, loss, lr, grad norm, max attention logit, |log Z|, val loss)
  probe            on the first validation batch at the end: the largest attention logit (after the query
                   scale, before any cap, bias or mask, over layers and heads), the largest capped one,
                   mean |log Z| of the final logits, the largest |final logit|
  evals            extra evaluations of the final params asked for in `args` (other windows, longer T)
"""

from __future__ import annotations

import math
import statistics
import time

HISTORY_KEYS = ("step", "loss", "val_loss", "lr", "grad_norm", "update_ratio", "max_attn_logit", "log_z_abs",
                "tokens_per_s", "finite", "z_loss")
TAIL_FRACTION = 0.05


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _clean(record: dict, per_layer: bool) -> dict:
    out = {}
    for k, v in record.items():
        if k in HISTORY_KEYS or (per_layer and "/" in k):
            out[k] = None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
    return out


def probe(cfg, params, batch) -> dict:
    """Stability signals of `params` on one batch (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from lecture3 import losses
    from lecture3.model import Transformer

    @jax.jit
    def go(params, inputs):
        out = Transformer(cfg).apply({"params": params}, inputs, capture=("attn_logit_max",))
        return out.logits, out.captured["attn_logit_max"]

    logits, head_max = go(params, jnp.asarray(batch["inputs"]))
    log_z = losses.log_z(logits)
    pre = float(jnp.max(head_max))
    cap = cfg.attn_logit_softcap
    return {
        "max_attn_logit": pre,
        # the cap is cap * tanh(x / cap), monotone: the largest capped logit is the cap of the largest
        "max_attn_logit_capped": pre if cap is None else float(cap * math.tanh(pre / cap)),
        "log_z_abs": float(jnp.mean(jnp.abs(log_z))),
        "max_abs_logit": float(jnp.max(jnp.abs(logits))),
    }


def train_run(config, args: dict) -> dict:
    """Train `config` in memory and measure it; never raises on divergence (it is a result)."""
    from lecture3.config import Config
    from lecture3.loop import TrainingError, train

    cfg: Config = config
    seen: list[dict] = []

    def keep(record):
        seen.append(record)

    t0 = time.perf_counter()
    diverged_step, run = None, None
    try:
        run = train(cfg, callbacks=(keep,), progress=False, echo=lambda *a, **k: None)
        history, params = run.history.to_list(), run.params
    except TrainingError as e:  # on_nonfinite="stop": a non-finite loss at step e.step
        history, params = seen, None
        diverged_step = getattr(e, "step", None)
    return measure_trained(cfg, args, history, params, diverged_step, time.perf_counter() - t0)


def measure_trained(cfg, args: dict, history: list[dict], params, diverged_step: int | None, wall: float) -> dict:
    """The result of a finished training of `cfg` (however it was trained: alone or as a population
    member): divergence, final losses, the probe and the extra evaluations of `params` (None: diverged)."""
    import numpy as np

    from lecture3 import data as dataio
    from lecture3.loop import evaluate

    tcfg = cfg.train
    initial = math.log(cfg.model.vocab_size)
    per_layer = tcfg.log_per_layer
    hist = [_clean(r, per_layer) for r in history]
    losses_logged = [r.get("loss") for r in history if r.get("loss") is not None]
    if diverged_step is not None:  # a population member frozen at its divergence: its later records are NaN
        history = [r for r in history if r["step"] <= diverged_step]
    final_val = history[-1].get("val_loss") if history and diverged_step is None else None
    if diverged_step is None and any(not math.isfinite(x) for x in losses_logged):
        diverged_step = next(r["step"] for r in history if not math.isfinite(r.get("loss", 0.0)))
    diverged = diverged_step is not None or final_val is None or not math.isfinite(final_val) or final_val > initial
    if diverged and diverged_step is None:
        diverged_step = history[-1]["step"] if history else 0
    tail_from = tcfg.steps * (1 - TAIL_FRACTION)
    tail = [r["loss"] for r in history if r["step"] > tail_from and r.get("loss") is not None]
    speeds = [r["tokens_per_s"] for r in history if r.get("tokens_per_s")]
    result = {
        "final_val_loss": _finite(final_val),
        "final_loss": initial if diverged else float(final_val),
        "diverged": bool(diverged),
        "diverged_step": diverged_step,
        "initial_loss": initial,
        "train_loss_tail": _finite(statistics.fmean(tail)) if tail else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "train_wall_s": wall,
        "steps": tcfg.steps,
        "tokens": tcfg.steps * tcfg.batch_size * cfg.data.seq_len,
        "history": hist,
    }
    val = dataio.validation_batches(cfg.data, tcfg.batch_size)[: tcfg.eval_batches]
    if params is not None:
        result["probe"] = probe(cfg.model, params, val[0])
        evals = {}
        for w in args.get("eval_windows", ()):  # the same params, every layer local with window w
            mcfg = _with_window(cfg.model, w)
            evals[f"window_{w}"] = evaluate(mcfg, params, val)["loss"]
        lens = args.get("eval_seq_lens", ())
        if args.get("quick"):  # the tests' smoke run: the code path at twice the (shrunk) context
            lens = [2 * cfg.data.seq_len] if lens else []
        for t in lens:  # the same params at a longer context
            data = _replace(cfg.data, seq_len=t)
            mcfg = _replace(cfg.model, max_seq_len=max(cfg.model.max_seq_len, t))
            n = max(1, tcfg.eval_batches * cfg.data.seq_len // t)  # about the same number of tokens
            rows = dataio.validation_batches(data, tcfg.batch_size)[:n]
            evals[f"seq_len_{t}"] = evaluate(mcfg, params, rows)["loss"]
        if evals:
            result["evals"] = evals
        result["params"] = int(sum(np.size(x) for x in _leaves(params)))
    return result


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _with_window(mcfg, window: int):
    return _replace(mcfg, sliding_window=window, layer_pattern=("local",))


def population_runs(configs: list, args: dict) -> list[dict]:
    """Train `configs` (which differ only in `lecture3.population.MEMBER_KEYS`) as ONE population program
    and measure each member as `train_run` measures a solo run. The engine the harness uses on an
    accelerator (`runner.default_engine`); member i equals its solo run within float tolerance."""
    from lecture3 import population
    from lecture3.grid import config_diff

    base = configs[0]
    members = [{k: new for k, (_, new) in config_diff(base, c).items()} for c in configs]
    t0 = time.perf_counter()
    runs = population.train(base, members, progress=False, echo=lambda *a, **k: None)
    wall = (time.perf_counter() - t0) / len(configs)
    out = []
    for cfg, run in zip(configs, runs, strict=True):
        diverged = run.diverged_at
        out.append(measure_trained(cfg, args, run.history.to_list(), None if diverged is not None else run.params,
                                   diverged, wall))
        out[-1]["engine"] = f"population of {len(configs)}"
    return out
