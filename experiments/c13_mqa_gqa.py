"""Claim 13: multi-query and grouped-query attention shrink the KV cache and speed up decoding at a
small quality cost.

The lecture: with n_kv_heads < n_heads, query heads share key/value heads (MQA: one, Shazeer 2019; GQA:
a few groups, Ainslie et al. 2023), so the KV cache and the memory traffic of each decode step shrink by
n_heads / n_kv_heads while the loss barely moves. Shazeer 2019: perplexity 29.9 (MHA) vs 30.2 (MQA);
Ainslie 2023: GQA 47.2 at 0.28 ms per sample vs MHA 47.3 at 1.5 ms.

Test (protocol v2, claims.md): S with 8 heads (head_dim 16), KV heads {8, 2, 1}, d_ff raised to match
params within 2%, at the baseline's best LR, 4 seeds each, 600 steps, paired by seed; the KV cache of each
measured from a real prefill; a cached decode benchmark at context 1024.

Criteria (claims.md, verbatim; fixed before any run):
  (a) KV-cache bytes exactly 8 : 2 : 1 (measured = accounting);
  (b) decode time per token (paired rounds): GQA better than MHA, and MQA not worse than GQA by more
      than 2%;
  (c) MQA not worse than MHA by more than 2%, GQA not worse than MHA by more than 1%.
How each is judged:
  (a) deterministic (pass or fail): the measured bytes equal `lecture3.accounting.kv_cache_bytes` for every
      arm, and measured MHA = 4 x GQA = 8 x MQA exactly;
  (b) seconds per decoded token of each arm in each round, paired by round (the protocol's timing rule):
      the *better* rule on t_GQA − t_MHA, and the *not worse* rule on t_MQA − t_GQA with m = 2% of
      mean(t_GQA); passes if both pass, fails if either fails, else inconclusive;
  (c) final validation losses paired by seed (a diverged run counted as ln V): the *not worse* rule on
      L_MQA − L_MHA with m = 2% of mean(L_MHA), and on L_GQA − L_MHA with m = 1% of mean(L_MHA); passes if
      both pass, fails if either fails, else inconclusive.

Choices claims.md leaves open, made here before any run and kept:
  - LR: "the baseline's best LR" is model S's best LR over {1e-3, 3e-3, 1e-2} from the 12 shared runs of
    claims 3 and 4 (`protocol.baseline_specs`, part of this grid so the claim judges on them); the three
    arms train at that LR once it is known (until then the grid holds only the 12 runs and the measures,
    and (c) is not judged: runs missing). The report says which LR.
  - The claim's baseline arm (the one that must end below the count bigram) is MHA.
  - d_ff: the integer whose non-embedding N (lecture3.accounting.param_counts) is closest to MHA's
    (S's default 384): 448 for GQA (exact match), 459 for MQA (+512 params, +0.06%).
  - max_seq_len 2048 for every arm (RoPE has no table, so training is unchanged); it covers the benchmark.
  - The measures (a) and (b) train nothing and read no LR: their configs carry the nominal LR 3e-3 and
    they are in the grid from the start.
  - KV-cache bytes (a): one prefill of 1024 tokens (batch 1) through `lecture3.decoding.prefill` into a
    cache of 1024 slots; measured = the sum of `nbytes` of every layer's k and v arrays (the idx / pos
    bookkeeping excluded, as the accounting does); accounting = kv_cache_bytes(model, 1, 1024).
  - Decode benchmark (b): batch 8 (a serving batch, where the cache dominates the memory a step reads),
    a prefill of 1024 tokens into a cache of 1024 + 64 slots, then 64 new tokens greedy through
    `lecture3.decoding.decode` (one compiled loop, f32); time per token = wall time of the decode / 64
    (prefill not timed; each step decodes one token for every row of the batch). Fresh init params (seed
    0): the speed does not depend on the weights' values. One compile-and-warm-up pass per arm, then 7
    rounds; each round runs the three arms back to back, the order reversed every other round, so machine
    noise hits all alike; each round decodes from a copy of the arm's prefilled cache. The run is
    exclusive (alone on the machine).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from lecture3 import accounting
from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, Criterion, RunSpec

MEASURE_LR = 3e-3  # nominal: the measures (kv_cache, decode_speed) train nothing and read no LR
N_HEADS = 8
MAX_SEQ_LEN = 2048
# arm -> (n_kv_heads, d_ff)
ARMS = {"mha": (8, 384), "gqa": (2, 448), "mqa": (1, 459)}
CONTEXT = 1024
DECODE = {"context": CONTEXT, "new_tokens": 64, "batch": 8, "rounds": 7}
KV_BATCH = 1
PARAM_TOLERANCE = 0.02


def arm_model(arm: str):
    kv, ff = ARMS[arm]
    return protocol.model_s(n_heads=N_HEADS, n_kv_heads=kv, d_ff=ff, max_seq_len=MAX_SEQ_LEN)


def param_match() -> dict[str, float]:
    """N / N_MHA − 1 of every arm (non-embedding parameters, from the config)."""
    base = accounting.param_counts(arm_model("mha"))["non_embedding"]
    return {arm: accounting.param_counts(arm_model(arm))["non_embedding"] / base - 1 for arm in ARMS}


def check_param_match() -> None:
    bad = {arm: r for arm, r in param_match().items() if abs(r) > PARAM_TOLERANCE}
    if bad:
        raise ValueError(f"c13: non-embedding params outside ±2% of MHA's: {bad}")


def runs(scale: str) -> list[RunSpec]:
    """S's 12 baseline runs, the KV-cache and decode measures, and the three arms at the baseline's best LR
    once that is known."""
    check_param_match()
    lr = protocol.baseline_best_lr(scale)
    out = protocol.baseline_specs(scale)
    if lr is not None:
        out += [RunSpec(protocol.config(arm_model(arm), lr=lr, seed=seed, scale=scale),
                        {"arm": arm, "kv_heads": ARMS[arm][0], "lr": lr, "seed": seed})
                for arm in ARMS for seed in protocol.SEEDS]
    out += [RunSpec(protocol.config(arm_model(arm), lr=MEASURE_LR, seed=0, scale=scale), {"arm": arm},
                    measure="kv_cache", args={"context": CONTEXT, "batch": KV_BATCH})
            for arm in ARMS]
    arms = {arm: {"n_kv_heads": kv, "d_ff": ff} for arm, (kv, ff) in ARMS.items()}
    if scale == "gpu":  # the same widening protocol.config gives the model
        arms = {a: {**ch, "d_ff": ch["d_ff"] * protocol.GPU_WIDTH} for a, ch in arms.items()}
    out.append(RunSpec(protocol.config(arm_model("mha"), lr=MEASURE_LR, seed=0, scale=scale), {"arm": "decode"},
                       measure="decode_speed", args={"arms": arms, **DECODE}, exclusive=True))
    return out


# ---------------------------------------------------------------- measures (no training)


def _prompt(mcfg, batch: int, length: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, mcfg.vocab_size, (batch, length)).astype(np.int32)


def kv_cache(config, context: int = CONTEXT, batch: int = KV_BATCH, quick: bool = False) -> dict:
    """KV-cache bytes of a real prefill of `context` tokens vs the accounting's."""
    import jax
    import jax.numpy as jnp

    from lecture3 import decoding
    from lecture3.layers.kv_cache import cache_bytes
    from lecture3.loop import init_params

    if quick:
        context, batch = 64, 1
    mcfg = config.model
    params = init_params(mcfg, 0)
    tokens = jnp.asarray(_prompt(mcfg, batch, context))
    cache, _ = decoding.prefill(mcfg, params, tokens, jnp.full((batch,), context, jnp.int32), context)
    jax.block_until_ready(cache)
    layers = jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, dict) and "k" in x)
    return {"measured_bytes": int(cache_bytes(cache)),
            "accounting_bytes": int(accounting.kv_cache_bytes(mcfg, batch, context)),
            "k_shapes": [list(layer["k"].shape) for layer in layers],
            "n_kv_heads": mcfg.resolved_n_kv_heads, "context": context, "batch": batch}


def decode_speed(config, arms: dict, context: int = CONTEXT, new_tokens: int = 64, batch: int = 8,
                 rounds: int = 7, quick: bool = False) -> dict:
    """Seconds per decoded token of each arm in each round, rounds interleaved in this one process (see the
    module docstring); also tokens/s (every row of the batch) for the report."""
    import jax.numpy as jnp

    from lecture3 import decoding
    from lecture3.loop import init_params

    if quick:
        context, new_tokens, batch, rounds = 32, 4, 2, 2
    length = context + new_tokens
    prepared = {}
    for name, changes in arms.items():
        mcfg = dataclasses.replace(config.model, **changes)
        params = init_params(mcfg, 0)
        tokens = jnp.asarray(_prompt(mcfg, batch, context))
        lens = jnp.full((batch,), context, jnp.int32)
        cache, last = decoding.prefill(mcfg, params, tokens, lens, length)
        prepared[name] = (mcfg, params, cache, last, lens)
        _decode(*prepared[name], new_tokens)  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in prepared}
    names = list(prepared)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(_decode(*prepared[name], new_tokens))
    per_token = {n: [t / new_tokens for t in ts] for n, ts in times.items()}
    return {"rounds_s_per_token": per_token,
            "median_s_per_token": {n: statistics.median(v) for n, v in per_token.items()},
            "tokens_per_s": {n: batch / statistics.median(v) for n, v in per_token.items()},
            "context": context, "new_tokens": new_tokens, "batch": batch, "rounds": rounds}


def _decode(mcfg, params, cache, last, lens, new_tokens: int) -> float:
    """Seconds to decode `new_tokens` greedy tokens from a copy of the prefilled cache (decode donates it)."""
    import jax
    import jax.numpy as jnp

    from lecture3 import decoding

    fresh = jax.tree.map(jnp.copy, cache)
    jax.block_until_ready(fresh)
    t0 = time.perf_counter()
    _, out, _ = decoding.decode(mcfg, params, fresh, last, lens, jax.random.key(0), jnp.float32(1.0),
                                jnp.int32(mcfg.vocab_size), jnp.float32(1.0), steps=new_tokens, greedy=True,
                                keep_logits=False)
    jax.block_until_ready(out)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- criteria




def _kv(results) -> dict | None:
    out = {arm: results.measured("kv_cache", arm=arm) for arm in ARMS}
    return None if None in out.values() else out


def _speed(results) -> dict | None:
    return results.measured("decode_speed")


def per_round(speed: dict, arm: str) -> dict[int, float]:
    """round -> seconds per decoded token of `arm` (what the paired timing comparison takes)."""
    return dict(enumerate(speed["rounds_s_per_token"][arm]))


def crit_a(results):
    kv = _kv(results)
    if kv is None:
        return judge.missing("kv_cache")
    m = {a: kv[a]["measured_bytes"] for a in ARMS}
    same = all(kv[a]["measured_bytes"] == kv[a]["accounting_bytes"] for a in ARMS)
    ratio = m["mha"] == 4 * m["gqa"] == 8 * m["mqa"]
    return judge.check(same and ratio, (
        "measured / accounting bytes at context " + str(kv["mha"]["context"]) + ": "
        + ", ".join(f"{a} {kv[a]['measured_bytes']:,} / {kv[a]['accounting_bytes']:,}" for a in ARMS)
        + f" (measured = accounting: {same}); measured ratio {m['mha'] / m['mqa']:g} : {m['gqa'] / m['mqa']:g} : 1"
        + f" (exactly 8 : 2 : 1: {ratio})"))


def crit_b(results):
    s = _speed(results)
    if s is None:
        return judge.missing("decode_speed")
    t = {a: per_round(s, a) for a in ARMS}
    out, detail, comps = judge.all_of([
        judge.compare_values(t["gqa"], t["mha"], "better", unit="s/token", label="t_GQA − t_MHA"),
        judge.compare_values(t["mqa"], t["gqa"], "not_worse", margin_fraction=0.02, unit="s/token",
                             label="t_MQA − t_GQA")])
    return out, (f"decode at context {s['context']} (batch {s['batch']}, {s['new_tokens']} new tokens, "
                 f"{s['rounds']} interleaved rounds, paired by round): {detail}"), comps


def crit_c(results):
    lr = judge.baseline_lr(results)
    if lr is None:
        return judge.missing("the baseline's LR grid")
    arm = {a: {"arm": a, "lr": lr} for a in ARMS}
    return judge.all_of([
        judge.compare(results, arm["mqa"], arm["mha"], "not_worse", margin_fraction=0.02, label="L_MQA − L_MHA"),
        judge.compare(results, arm["gqa"], arm["mha"], "not_worse", margin_fraction=0.01, label="L_GQA − L_MHA")])


def criteria(results) -> list[Criterion]:
    return [judge.criterion("(a)", "KV-cache bytes exactly 8 : 2 : 1 (measured = accounting)", crit_a(results)),
            judge.criterion("(b)", "decode time per token (paired rounds): GQA better than MHA, and MQA not worse "
                            "than GQA by more than 2%", crit_b(results)),
            judge.criterion("(c)", "MQA not worse than MHA by more than 2%, GQA not worse than MHA by more than 1%",
                            crit_c(results))]


def plots(results, folder):
    figs = []
    labels, lr = [a for a in ARMS if results.select(arm=a)], judge.baseline_lr(results)
    if labels:
        figs.append(report.bars([f"{a} ({ARMS[a][0]} kv)" for a in labels], [results.values(arm=a) for a in labels],
                                folder, "loss_by_kv_heads.png", "final val loss (nats)",
                                "final val loss" + (f", LR {lr:g}" if lr is not None else "")))
    s = _speed(results)
    if s is not None:
        names = [a for a in ARMS if a in s["rounds_s_per_token"]]
        figs.append(report.bars(names, [[1e3 * x for x in s["rounds_s_per_token"][a]] for a in names], folder,
                                "decode_time.png", "ms per decoded token",
                                f"cached decoding at context {s['context']}, interleaved rounds"))
    return figs


def observations(results) -> list[str]:
    lr = judge.baseline_lr(results)
    out = [f"LR of the three arms: {lr:g} (the baseline's best LR)" if lr is not None else
           "the baseline's best LR is not known yet: the arms have not trained",
           "non-embedding params vs MHA (config accounting): "
           + ", ".join(f"{a} {100 * r:+.2f}%" for a, r in param_match().items())]
    s = _speed(results)
    if s is not None:
        t = s["median_s_per_token"]
        out.append(f"decode speed-up vs MHA (medians over rounds): GQA {t['mha'] / t['gqa']:.2f}x, "
                   f"MQA {t['mha'] / t['mqa']:.2f}x")
    return out


def key_number(results) -> str:
    s = _speed(results)
    parts = []
    if s is not None:
        t = s["median_s_per_token"]
        parts.append(f"MQA decodes {t['mha'] / t['mqa']:.2f}x MHA")
    lr = judge.baseline_lr(results)
    if lr is not None and all(results.full(arm=a, lr=lr) for a in ARMS):
        mha, mqa = stats.mean(results.values(arm="mha", lr=lr)), stats.mean(results.values(arm="mqa", lr=lr))
        parts.append(f"loss {100 * (mqa - mha) / mha:+.2f}%")
    return ", ".join(parts)


CLAIM = Claim(
    number=13, name="c13_mqa_gqa", title="MQA/GQA shrink the KV cache and speed decoding at a small quality cost",
    lecture="Sharing key/value heads between query heads (MQA: one, GQA: a few groups) divides the KV cache and "
            "the memory each decode step reads by n_heads / n_kv_heads, for a small loss in quality.",
    references="Shazeer 2019: perplexity 29.9 (MHA) vs 30.2 (MQA); Ainslie et al. 2023: GQA 47.2 at 0.28 ms vs "
               "MHA 47.3 at 1.5 ms per sample.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number, observations=observations,
    baseline={"arm": "mha"},
    setup="Model S with 8 heads of 16; n_kv_heads 8 / 2 / 1 with d_ff 384 / 448 / 459 (non-embedding params "
          "within 0.1% of MHA), at the baseline's best LR (S's best over {1e-3, 3e-3, 1e-2}, from the 12 shared "
          "runs in this grid), 600 steps, 4 seeds. KV cache: a prefill of 1024 tokens, batch 1, measured from "
          "the cache arrays. Decoding: batch 8, prefill 1024, 64 greedy tokens, 7 interleaved rounds, seconds "
          "per token paired by round.",
)
