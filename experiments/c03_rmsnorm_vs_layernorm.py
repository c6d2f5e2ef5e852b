"""Claim 3: RMSNorm is as good as LayerNorm and cheaper, mostly in memory movement.

The lecture: RMSNorm drops LayerNorm's mean subtraction and bias; it trains as well, and although norms
are a tiny share of the FLOPs they take a much larger share of the runtime, because they move memory.

Test (protocol v2): model S with RMSNorm vs LayerNorm (with bias), LR {1e-3, 3e-3, 1e-2}, 4 seeds, 600
steps; step times; a norm's runtime share = (t - t with that norm replaced by identity) / t.

Criteria (claims.md, fixed before any run):
  (a) norm params d vs 2d per norm (from the params tree);
  (b) RMSNorm's step time better than LayerNorm's;
  (c) each norm's runtime share >= 10x its FLOP share (median shares);
  (d) RMSNorm not worse than LayerNorm by more than 1% at each's best LR.

Timing (claims.md): every arm in one process, the step that `lecture3 train` runs on that machine, >= 7
interleaved rounds; comparisons pair the arms' times round by round with the rule above.

Choices made here:
- The RMSNorm arm IS the baseline S: its runs are `protocol.baseline_specs(scale)` (the same configs, so
  the same keys and records as every claim that shares S's LR grid), tagged arm=rmsnorm here.
- (a) counts the params of every norm of the params tree (keys `*_norm`: each layer's two and the final
  one) at init; it passes when each RMSNorm has d and each LayerNorm 2d. Deterministic.
- Timing: one exclusive run times RMSNorm, LayerNorm and S with every norm replaced by the identity
  (norm="none") in one process, 7 interleaved rounds of 10 steps; seed 0, LR 3e-3 (the step's cost does
  not depend on the LR value). (b) is the *better* rule on the per-round step times paired by round
  (n = 7, seconds).
- (c) a norm's runtime share in round r is (t_norm(r) - t_identity(r)) / t_norm(r); its median over the
  rounds must be >= 10x the FLOP share, for RMSNorm and for LayerNorm. Deterministic. The FLOP share
  counts a norm's forward as 4d FLOPs per token for RMSNorm (square, sum, scale by the reciprocal, gain)
  and 7d for LayerNorm (mean, subtract, square, sum, scale, gain, bias), training as 3x the forward, over
  every norm of the model (2 per layer and the final one), divided by accounting's training FLOPs per
  token plus these.
- (d) the margin is 1% of LayerNorm's mean loss at its best LR. The claim's baseline arm is RMSNorm.
"""

from __future__ import annotations

import dataclasses
import statistics

from lecture3 import accounting
from lecture3.experiment import judge, measures, protocol, report
from lecture3.experiment.spec import Claim, RunSpec

ARMS = {"rmsnorm": {"norm": "rmsnorm"}, "layernorm": {"norm": "layernorm", "norm_bias": True}}
IDENTITY = {"norm": "none"}  # the timing's third arm: every norm replaced by the identity
NORM_FLOPS = {"rmsnorm": 4, "layernorm": 7}  # forward FLOPs per element
PARAMS_PER_D = {"rmsnorm": 1, "layernorm": 2}  # (a): params per norm, in units of d
SHARE_FACTOR = 10.0  # (c)
TIMING_LR, TIMING_SEED = 3e-3, 0
RMS, LN = {"arm": "rmsnorm"}, {"arm": "layernorm"}


def runs(scale: str) -> list[RunSpec]:
    out = [dataclasses.replace(s, tags={**s.tags, "arm": "rmsnorm"}) for s in protocol.baseline_specs(scale)]
    out += [RunSpec(protocol.config(protocol.model_s(**ARMS["layernorm"]), lr=lr, seed=seed, scale=scale),
                    {"arm": "layernorm", "lr": lr, "seed": seed})
            for lr in protocol.LRS for seed in protocol.SEEDS]
    cfg = protocol.config(protocol.model_s(), lr=TIMING_LR, seed=TIMING_SEED, scale=scale)
    out.append(RunSpec(cfg, {"arm": "norm_params"}, measure="norm_params"))
    out.append(RunSpec(cfg, {"arm": "timing"}, measure="norm_timing", args={"rounds": 7, "steps_per_round": 10},
                       exclusive=True))
    return out


def arm_configs(config) -> dict:
    """The configs of the timing's arms: `config` with each norm, and with the identity."""
    arms = {**ARMS, "identity": IDENTITY}
    return {arm: config.replace(model=dataclasses.replace(config.model, **ch)) for arm, ch in arms.items()}


def norm_params(config, quick: bool = False) -> dict:
    """Params of every norm in the params tree (keys `*_norm`) of each arm, at init."""
    import jax

    import lecture3

    out = {"d_model": config.model.d_model, "per_norm": {}}
    for arm, cfg in arm_configs(config).items():
        if arm in ARMS:
            tree = jax.eval_shape(lambda cfg=cfg: lecture3.init_params(cfg.model, 0))
            out["per_norm"][arm] = _norm_sizes(tree)
    return out


def _norm_sizes(tree, prefix: str = "") -> dict[str, int]:
    import math

    import jax

    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if k.endswith("_norm"):
            out[path] = sum(math.prod(x.shape) for x in jax.tree.leaves(v))
        elif isinstance(v, dict):
            out.update(_norm_sizes(v, path + "/"))
    return out


def norm_timing(config, rounds: int = 7, steps_per_round: int = 10, quick: bool = False) -> dict:
    return measures.step_times(arm_configs(config), rounds=2 if quick else rounds,
                               steps_per_round=2 if quick else steps_per_round)


def flop_share(model, arm: str, seq_len: int) -> float:
    """The FLOP share of `arm`'s norms in a training step of `model` (see the module docstring)."""
    n_norms = 2 * model.n_layers + int(model.has_final_norm)
    norm = 3 * NORM_FLOPS[arm] * model.d_model * n_norms
    return norm / (accounting.flops_per_token(model, seq_len)["training"] + norm)


def _timing(results):
    rows = results.select("norm_timing")
    return (rows[0][0], rows[0][1]["result"]) if rows else (None, None)


def crit_a(results):
    t = results.measured("norm_params")
    if t is None:
        return judge.missing("norm params")
    d, per = t["d_model"], t["per_norm"]
    ok = all(per[arm] and all(n == PARAMS_PER_D[arm] * d for n in per[arm].values()) for arm in ARMS)
    return judge.check(ok, "; ".join(f"{arm}: {sorted(set(per[arm].values()))} params per norm over "
                                     f"{len(per[arm])} norms" for arm in ARMS) + f" (d = {d})")


def _rounds(t: dict, arm: str) -> dict[int, float]:
    return dict(enumerate(t["rounds_s"][arm]))


def crit_b(results):
    _, t = _timing(results)
    if t is None:
        return judge.missing("step times")
    return judge.compare_values(_rounds(t, "rmsnorm"), _rounds(t, "layernorm"), "better", unit="s",
                                label="step time RMSNorm − LayerNorm (paired by round)")


def runtime_shares(t: dict) -> dict[str, float]:
    """Median over rounds of each norm's runtime share (t_norm - t_identity) / t_norm in that round."""
    ident = t["rounds_s"]["identity"]
    return {arm: statistics.median([(x - i) / x for x, i in zip(t["rounds_s"][arm], ident, strict=True)])
            for arm in ARMS}


def crit_c(results):
    spec, t = _timing(results)
    if t is None:
        return judge.missing("step times")
    share = runtime_shares(t)
    cfgs = arm_configs(spec.config)
    flops = {arm: flop_share(cfgs[arm].model, arm, spec.config.data.seq_len) for arm in ARMS}
    ok = all(share[a] >= SHARE_FACTOR * flops[a] for a in ARMS)
    return judge.check(ok, "; ".join(f"{a}: median runtime share {100 * share[a]:.1f}%, FLOP share "
                                     f"{100 * flops[a]:.2f}% (ratio {share[a] / flops[a]:.1f}x)" for a in ARMS))


def crit_d(results):
    return judge.compare(results, RMS, LN, "not_worse", best_lr=True)


def criteria(results):
    return [
        judge.criterion("(a)", "norm params: d per RMSNorm vs 2d per LayerNorm (from the params tree)",
                        crit_a(results)),
        judge.criterion("(b)", "RMSNorm's step time better than LayerNorm's (paired by round)", crit_b(results)),
        judge.criterion("(c)", f"each norm's runtime share >= {SHARE_FACTOR:g}x its FLOP share (median shares)",
                        crit_c(results)),
        judge.criterion("(d)", "RMSNorm not worse than LayerNorm by more than 1% at each's best LR",
                        crit_d(results)),
    ]


def plots(results, folder):
    figs = [report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="S: final val loss vs LR", arm="arm")]
    _, t = _timing(results)
    if t is not None:
        figs.append(report.step_time_bars(t, folder))
    return figs


def key_number(results) -> str:
    _, t = _timing(results)
    return "" if t is None else f"median norm runtime share {100 * runtime_shares(t)['rmsnorm']:.0f}% (RMSNorm)"


CLAIM = Claim(
    number=3, name="c03_rmsnorm_vs_layernorm", title="RMSNorm is as good as LayerNorm and cheaper",
    lecture="RMSNorm drops LayerNorm's mean subtraction and bias. It trains as well, and it is cheaper: norms "
            "are a tiny share of the FLOPs but a large share of the runtime, because they move memory.",
    references="Narang et al. 2021: 3.68 vs 3.50 steps/s, loss 1.821 vs 1.838; Ivanov et al. 2023: "
               "normalisation is 0.17% of the FLOPs and 25.5% of the runtime.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number, baseline=RMS,
    setup=f"Model S with RMSNorm (the baseline's runs) vs LayerNorm (with bias), LR {{1e-3, 3e-3, 1e-2}} x "
          f"{len(protocol.SEEDS)} seeds, {protocol.STEPS} steps; step times of RMSNorm, LayerNorm and identity "
          "norms in one process, 7 interleaved rounds of 10 steps.",
)
