"""Claim 3: RMSNorm is as good as LayerNorm and cheaper, mostly in memory movement.

The lecture: RMSNorm drops LayerNorm's mean subtraction and bias; it trains as well, and although norms
are a tiny share of the FLOPs they take a much larger share of the runtime, because they move memory.

Test: model S with RMSNorm vs LayerNorm with bias, 3-point LR grid x 3 seeds; the step time of each, and
of S with every norm replaced by the identity, in ONE process (median of 7 interleaved rounds of 10 steps).

Criteria (fixed before any run):
  (a) params per norm: d for RMSNorm, 2d for LayerNorm (counted from the params tree);
  (b) RMSNorm's step time <= LayerNorm's;
  (c) the norm's runtime share, (t − t with norms replaced by identity) / t, is >= 10x its FLOP share;
  (d) RMSNorm equal to or better than LayerNorm at each one's best LR.

Choices made here: the FLOP share counts a norm's forward as 4d FLOPs per token for RMSNorm (square,
sum, scale by the reciprocal, gain) and 7d for LayerNorm (mean, subtract, square, sum, scale, gain,
bias), training as 3x the forward, over the 2 norms per layer and the final norm, divided by
accounting's training FLOPs plus these; (c) must hold for both norms.
"""

from __future__ import annotations

from lecture3 import accounting
from lecture3.experiment import judge, measures, protocol, report
from lecture3.experiment.spec import Claim, RunSpec

ARMS = {"rmsnorm": {"norm": "rmsnorm"}, "layernorm": {"norm": "layernorm", "norm_bias": True}}
NORM_FLOPS = {"rmsnorm": 4, "layernorm": 7}  # forward FLOPs per element


def runs(scale: str) -> list[RunSpec]:
    out = [RunSpec(protocol.config(protocol.model_s(**ch), lr=lr, seed=seed, scale=scale),
                   {"arm": arm, "lr": lr, "seed": seed})
           for arm, ch in ARMS.items() for lr in protocol.LRS for seed in protocol.SEEDS]
    out.append(RunSpec(protocol.config(protocol.model_s(), lr=3e-3, seed=0, scale=scale), {"arm": "timing"},
                       measure="norm_timing", args={"rounds": 7, "steps_per_round": 10}, exclusive=True))
    return out


def norm_timing(config, rounds: int = 7, steps_per_round: int = 10, quick: bool = False) -> dict:
    import dataclasses

    import lecture3

    cfgs = {arm: config.replace(model=dataclasses.replace(config.model, **ch)) for arm, ch in ARMS.items()}
    cfgs["identity"] = config.replace(model=dataclasses.replace(config.model, norm="none"))
    out = measures.step_times(cfgs, rounds=2 if quick else rounds, steps_per_round=2 if quick else steps_per_round)
    out["norm_params"] = {}
    for arm, cfg in cfgs.items():
        if arm == "identity":
            continue
        params = lecture3.init_params(cfg.model, 0)
        out["norm_params"][arm] = {"attn_norm": sum(x.size for x in _leaves(params["layer_0"]["attn_norm"])),
                                   "d_model": cfg.model.d_model}
    seq = config.data.seq_len
    for arm, cfg in cfgs.items():
        if arm == "identity":
            continue
        m = cfg.model
        norm = 3 * NORM_FLOPS[arm] * m.d_model * (2 * m.n_layers + 1)
        total = accounting.flops_per_token(m, seq)["training"] + norm
        out.setdefault("flop_share", {})[arm] = norm / total
    return out


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def _timing(results):
    return results.measured("norm_timing")


def crit_a(results):
    t = _timing(results)
    if t is None:
        return judge.missing()
    p = t["norm_params"]
    rms, ln = p["rmsnorm"], p["layernorm"]
    ok = rms["attn_norm"] == rms["d_model"] and ln["attn_norm"] == 2 * ln["d_model"]
    return ok, f"params per norm: RMSNorm {rms['attn_norm']}, LayerNorm {ln['attn_norm']} (d = {rms['d_model']})"


def _shares(t):
    med = t["median_s"]
    return {arm: (med[arm] - med["identity"]) / med[arm] for arm in ARMS}


def crit_b(results):
    t = _timing(results)
    if t is None:
        return judge.missing()
    med = t["median_s"]
    return med["rmsnorm"] <= med["layernorm"], (
        f"median step: RMSNorm {1e3 * med['rmsnorm']:.2f} ms, LayerNorm {1e3 * med['layernorm']:.2f} ms, identity "
        f"{1e3 * med['identity']:.2f} ms ({t['rounds']} interleaved rounds of {t['steps_per_round']} steps)")


def crit_c(results):
    t = _timing(results)
    if t is None:
        return judge.missing()
    share, flops = _shares(t), t["flop_share"]
    ok = all(share[a] >= 10 * flops[a] for a in ARMS)
    return ok, "; ".join(f"{a}: runtime share {100 * share[a]:.1f}%, FLOP share {100 * flops[a]:.2f}% "
                         f"(ratio {share[a] / flops[a]:.1f}x)" for a in ARMS)


def criteria(results):
    return [
        judge.criterion("(a)", "norm params: d (RMSNorm) vs 2d (LayerNorm) per norm", crit_a(results)),
        judge.criterion("(b)", "RMSNorm step time <= LayerNorm's", crit_b(results)),
        judge.criterion("(c)", "the norm's runtime share >= 10x its FLOP share (both norms)", crit_c(results)),
        judge.criterion("(d)", "RMSNorm equal or better at each one's best LR",
                        judge.equal_at_best_lr(results, {"arm": "rmsnorm"}, {"arm": "layernorm"},
                                               allowed=("equal", "better"))),
    ]


def plots(results, folder):
    figs = [report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="S: final val loss vs LR",
                              arm="arm")]
    t = _timing(results)
    if t is not None:
        figs.append(report.step_time_bars(t, folder))
    return figs


def key_number(results) -> str:
    t = _timing(results)
    if t is None:
        return ""
    s = _shares(t)
    return (f"norm runtime share {100 * s['rmsnorm']:.0f}% (RMSNorm) vs FLOP share "
            f"{100 * t['flop_share']['rmsnorm']:.1f}%")


CLAIM = Claim(
    number=3, name="c03_rmsnorm_vs_layernorm", title="RMSNorm is as good as LayerNorm and cheaper",
    lecture="RMSNorm drops LayerNorm's mean subtraction and bias. It trains as well, and it is cheaper: norms "
            "are a tiny share of the FLOPs but a large share of the runtime, because they move memory.",
    references="Narang et al. 2021: 3.68 vs 3.50 steps/s, loss 1.821 vs 1.838; Ivanov et al. 2023: "
               "normalisation is 0.17% of the FLOPs and 25.5% of the runtime.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number,
    setup="Model S with RMSNorm vs LayerNorm (with bias), LR {1e-3, 3e-3, 1e-2} x 3 seeds; step times of "
          "RMSNorm, LayerNorm and identity norms in one process, 7 interleaved rounds of 10 steps.",
)
