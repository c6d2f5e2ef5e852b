"""Claim 14: sliding-window attention keeps most of the quality with bounded memory.

The lecture: a local layer attends to the last W keys only (Mistral, Gemma 2), so its KV cache stops
growing at W; interleaving local layers with a few global ones (Gemma 2: 1 : 1, Gemma 3: 5 : 1) keeps the
quality of full attention. Gemma 2: validation perplexity 1.63 / 1.63 / 1.64 at windows 4096 / 2048 / 1024.

Test: model S at context T = 256, 3 seeds per arm:
  (a) the full-attention model, trained, then its final params evaluated with every layer local at
      windows 256, 128, 64 and 32 (window 256 at T = 256 is full attention);
  (b) a model of 3 local (window 64) : 1 global layers (layer_pattern local, local, local, global),
      trained from scratch with the same recipe;
  (c) the KV cache of (b) at a context of 4096 tokens, measured from a real cache.

Criteria (fixed before any run):
  (a) the loss is non-decreasing as the window shrinks (mean over seeds: L(256) ≤ L(128) ≤ L(64) ≤ L(32)),
      and window 64 costs less than 2% relative ((L(64) − L(256)) / L(256) < 0.02);
  (b) local/global is within 1% relative of full attention ((mean(local/global) − mean(full)) / mean(full)
      ≤ 0.01; per-seed final validation losses, a diverged run counted as ln V);
  (c) the local/global model's KV-cache bytes at context 4096 equal the accounting's
      (`lecture3.accounting.kv_cache_bytes`) and are at most 30% of the full-attention model's.

Choices the protocol left open, made here before any run and kept:
  - LR: the claim gives no LR grid, so every run uses the protocol's baseline LR 3e-3.
  - Batch: 8 rows of 256 tokens (2,048 tokens per step, as the protocol's 16 x 128); 300 steps = 614,400
    tokens per run; validation 32 batches of 8 x 256 = 65,536 tokens (as claim 7).
  - (a) evaluates the same validation rows at each window (`eval_windows`: every layer local with window W,
    the mask changed, not the weights). L(W) is the mean over the 3 seeds. A diverged full-attention run has
    no params to evaluate: (a) then fails (counting ln V at every window would pass it vacuously).
  - (c) The cache: fresh init params (bytes do not depend on the weights), batch 1, a 4096-token prompt
    prefilled through the model's own cache path in chunks of 512 tokens (so the dense masked attention of
    one chunk stays small); measured = the sum of `nbytes` of every layer's k and v arrays (idx / pos
    bookkeeping excluded, as the accounting does). "Full" is the full-attention model's cache measured the
    same way (every layer keeps 4096 slots; a local layer keeps its 64). Expected: (3 x 64 + 4096) /
    (4 x 4096) = 26.2%. max_seq_len 4096 for these two measure configs (RoPE: no table).
  - "within 1% relative" is one-sided: local/global may be better than full by any amount.
"""

from __future__ import annotations

from lecture3 import accounting
from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, Criterion, RunSpec

LR = 3e-3
SEQ_LEN = 256
BATCH = 8
WINDOWS = (256, 128, 64, 32)
WINDOW = 64
PATTERN = ("local", "local", "local", "global")
KV_CONTEXT = 4096
KV_CHUNK = 512
KV_SHARE = 0.30
ARMS = {"full": {}, "local_global": {"layer_pattern": PATTERN, "sliding_window": WINDOW}}


def run_config(arm: str, seed: int, scale: str = "cpu", **model):
    cfg = protocol.config(protocol.model_s(**ARMS[arm], **model), lr=LR, seed=seed, seq_len=SEQ_LEN, scale=scale)
    return cfg.replace(**{"train.batch_size": BATCH})


def runs(scale: str) -> list[RunSpec]:
    out = [RunSpec(run_config("full", seed, scale), {"arm": "full", "lr": LR, "seed": seed},
                   args={"eval_windows": list(WINDOWS)}) for seed in protocol.SEEDS]
    out += [RunSpec(run_config("local_global", seed, scale), {"arm": "local_global", "lr": LR, "seed": seed})
            for seed in protocol.SEEDS]
    out += [RunSpec(run_config(arm, 0, scale, max_seq_len=KV_CONTEXT), {"arm": arm}, measure="kv_cache",
                    args={"context": KV_CONTEXT, "chunk": KV_CHUNK}) for arm in ARMS]
    return out


# ---------------------------------------------------------------- measure (no training)


def kv_cache(config, context: int = KV_CONTEXT, chunk: int = KV_CHUNK, quick: bool = False) -> dict:
    """KV-cache bytes after a real (chunked) prefill of `context` tokens, batch 1, vs the accounting's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lecture3.layers.kv_cache import cache_bytes, init_cache
    from lecture3.loop import init_params
    from lecture3.model import Transformer

    if quick:
        context, chunk = 128, 64
    mcfg = config.model
    params = init_params(mcfg, 0)
    tokens = np.random.default_rng(0).integers(0, mcfg.vocab_size, (1, context)).astype(np.int32)

    @jax.jit
    def step(params, cache, toks, idx):
        _, cache = Transformer(mcfg).apply({"params": params}, toks, positions=idx, cache=cache, q_idx=idx)
        return cache

    cache = init_cache(mcfg, 1, context)
    for start in range(0, context, chunk):
        stop = min(start + chunk, context)
        idx = jnp.arange(start, stop, dtype=jnp.int32)[None]
        cache = step(params, cache, jnp.asarray(tokens[:, start:stop]), idx)
    jax.block_until_ready(cache)
    layers = jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, dict) and "k" in x)
    filled = [int(jnp.sum(layer["idx"] >= 0)) for layer in layers]
    return {"measured_bytes": int(cache_bytes(cache)),
            "accounting_bytes": int(accounting.kv_cache_bytes(mcfg, 1, context)),
            "slots_per_layer": [int(layer["k"].shape[1]) for layer in layers], "filled_slots_per_layer": filled,
            "context": context, "chunk": chunk}


# ---------------------------------------------------------------- criteria


def _windows(results) -> dict[int, list[float]] | None:
    """Per-seed loss at each window, or None while full-attention runs are missing; {} if one diverged."""
    if not results.full(arm="full"):
        return None
    rows = sorted(results.select(arm="full"), key=lambda sr: sr[0].tags["seed"])
    if any(r["result"].get("diverged") or "evals" not in r["result"] for _, r in rows):
        return {}
    return {w: [r["result"]["evals"][f"window_{w}"] for _, r in rows] for w in WINDOWS}


def crit_a(results):
    table = _windows(results)
    if table is None:
        return judge.missing()
    if not table:
        return False, "a full-attention run diverged: no params to evaluate at the windows"
    means = [stats.mean(table[w]) for w in WINDOWS]
    monotone = all(a <= b for a, b in zip(means, means[1:], strict=False))
    cost = (stats.mean(table[WINDOW]) - means[0]) / means[0]
    return monotone and cost < 0.02, (
        "mean loss at windows " + ", ".join(f"{w}: {m:.4f}" for w, m in zip(WINDOWS, means, strict=True))
        + f" (non-decreasing: {monotone}); window {WINDOW} costs {100 * cost:+.2f}% relative (< 2%: {cost < 0.02})")


def crit_b(results):
    if not all(results.full(arm=a) for a in ARMS):
        return judge.missing()
    full, lg = results.values(arm="full"), results.values(arm="local_global")
    rel = (stats.mean(lg) - stats.mean(full)) / stats.mean(full)
    return rel <= 0.01, (f"local/global − full: {stats.mean(lg) - stats.mean(full):+.4f} ({100 * rel:+.2f}% "
                         f"relative); comparison rule: {stats.compare(lg, full)}")


def _kv(results) -> dict | None:
    out = {arm: results.measured("kv_cache", arm=arm) for arm in ARMS}
    return None if None in out.values() else out


def crit_c(results):
    kv = _kv(results)
    if kv is None:
        return judge.missing("kv_cache")
    lg, full = kv["local_global"], kv["full"]
    same = lg["measured_bytes"] == lg["accounting_bytes"]
    share = lg["measured_bytes"] / full["measured_bytes"]
    return same and share <= KV_SHARE, (
        f"at context {lg['context']}: local/global measured {lg['measured_bytes']:,} B, accounting "
        f"{lg['accounting_bytes']:,} B (equal: {same}); full measured {full['measured_bytes']:,} B (accounting "
        f"{full['accounting_bytes']:,}); share {100 * share:.1f}% (≤ 30%: {share <= KV_SHARE})")


def criteria(results) -> list[Criterion]:
    return [judge.criterion("(a)", "loss non-decreasing as the window shrinks, window 64 costs < 2% relative",
                            crit_a(results)),
            judge.criterion("(b)", "local/global within 1% relative of full", crit_b(results)),
            judge.criterion("(c)", "its KV-cache bytes at context 4096 = accounting's and ≤ 30% of full",
                            crit_c(results))]


def _window_points(results):
    pts = {}
    for _, rec in results.select(arm="full"):
        for w in WINDOWS:
            v = rec["result"].get("evals", {}).get(f"window_{w}")
            if v is not None:
                pts.setdefault(w, []).append(v)
    return pts


def plots(results, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = _window_points(results)
    if not pts:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ws = sorted(pts)
    ax.plot(ws, [stats.mean(pts[w]) for w in ws], marker="o", label="full-attention model, evaluated at window")
    for w in ws:
        ax.scatter([w] * len(pts[w]), pts[w], s=8, color="k", alpha=0.5)
    lg = [r["result"]["final_loss"] for _, r in results.select(arm="local_global")]
    if lg:
        ax.axhline(stats.mean(lg), color="C1", ls="--", label=f"3 local ({WINDOW}) : 1 global, trained")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ws)
    ax.set_xticklabels([str(w) for w in ws])
    ax.set_xlabel("attention window (T = 256)")
    ax.set_ylabel("val loss (nats)")
    ax.set_title("sliding window: evaluated vs trained", fontsize=9)
    ax.legend(fontsize=7)
    return [(report.save(fig, folder, "loss_vs_window.png"), "val loss vs attention window")]


def observations(results) -> list[str]:
    out = []
    rows = results.select(arm="full")
    diffs = [abs(r["result"]["evals"]["window_256"] - r["result"]["final_val_loss"]) for _, r in rows
             if r["result"].get("evals") and r["result"].get("final_val_loss") is not None]
    if diffs:
        out.append(f"window 256 vs the full model's own final val loss: largest |difference| {max(diffs):.2e} "
                   "(the same attention at T = 256)")
    kv = _kv(results)
    if kv is not None:
        out.append("KV slots per layer at context " + str(kv["full"]["context"]) + ": "
                   + "; ".join(f"{a} {kv[a]['slots_per_layer']}" for a in ARMS))
    return out


def key_number(results) -> str:
    parts = []
    table = _windows(results)
    if table:
        full = stats.mean(table[WINDOWS[0]])
        parts.append(f"window 64 {100 * (stats.mean(table[WINDOW]) - full) / full:+.2f}%")
    if all(results.full(arm=a) for a in ARMS):
        full, lg = stats.mean(results.values(arm="full")), stats.mean(results.values(arm="local_global"))
        parts.append(f"3:1 local/global {100 * (lg - full) / full:+.2f}%")
    kv = _kv(results)
    if kv is not None:
        parts.append(f"KV {100 * kv['local_global']['measured_bytes'] / kv['full']['measured_bytes']:.0f}% of full")
    return ", ".join(parts)


CLAIM = Claim(
    number=14, name="c14_sliding_window",
    title="sliding-window attention keeps most of the quality with bounded memory",
    lecture="A local layer attends to its last W keys, so its KV cache stops growing at W; mixing local layers "
            "with a few global ones keeps the quality of full attention at a fraction of the memory.",
    references="Gemma 2 (Team 2024): validation perplexity 1.63 / 1.63 / 1.64 at windows 4096 / 2048 / 1024.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number, observations=observations,
    setup="Model S at T = 256 (batch 8 x 256), LR 3e-3, 3 seeds: full attention (evaluated at windows 256, 128, "
          "64, 32) and 3 local (window 64) : 1 global trained from scratch; KV cache of each at context 4096 "
          "measured from a chunked prefill (batch 1, fresh params).",
)
