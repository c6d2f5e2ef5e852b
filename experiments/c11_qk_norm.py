"""Claim 11: QK-norm prevents attention-logit growth and lowers LR sensitivity.

The lecture: normalising queries and keys before their dot product (Dehghani et al. 2023; OLMo 2,
Gemma 3) bounds the attention logits, whose growth is a known cause of divergence at high LR.

Test (protocol v2, `shared/claims.md`): model M with 6 layers, LR {1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1},
qk_norm off vs per_head, 600 steps, 4 seeds.

Criteria (claims.md, fixed before any run):
  (a) QK-norm's LR sensitivity better than off's;
  (b) at LR 3e-1, max attention logit without QK-norm >= 10x with it, in every seed;
  (c) equivalent within 1% at LR 1e-3 and at LR 3e-3 (each).

Choices claims.md leaves open, made here and kept:
  - (a) is the better rule on the per-seed LR sensitivity (nats, over the six LRs), paired by seed.
  - (b) is deterministic: the ratio off / per_head of the same seed's max attention logits, in every seed.
    The max attention logit of a run is the record's probe (the largest q·k logit after the query scale,
    before any cap, bias or mask, over layers and heads, on the first validation batch at the end); a run
    that diverged has no probe, and its value is the last finite one logged in training (the same
    quantity on that step's training batch). A seed where either run has no finite value fails (b).
  - (c) is the equivalence rule on the final loss, per-head against off, at LR 1e-3 and at LR 3e-3, with
    the protocol's margin (1% of off's mean); each must pass.
  - the baseline arm is qk_norm off at its best LR of the grid.
"""

from __future__ import annotations

from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, RunSpec

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
ARMS = {"off": None, "per_head": "per_head"}
TOP_LR = 3e-1
RATIO = 10.0  # (b): off's max attention logit >= 10x per_head's
EQUIVALENT_AT = (1e-3, 3e-3)  # (c)


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(protocol.model_m(n_layers=6, qk_norm=q), lr=lr, seed=seed, scale=scale),
                    {"arm": arm, "lr": lr, "seed": seed})
            for arm, q in ARMS.items() for lr in LRS for seed in protocol.SEEDS]




def logits_by_seed(results, arm: str, lr: float) -> dict[int, float | None]:
    return {s.tags["seed"]: judge.max_attn_logit(r["result"]) for s, r in results.select(arm=arm, lr=lr)}


def crit_a(results):
    return judge.compare_sensitivity(results, {"arm": "per_head"}, {"arm": "off"}, "better",
                                     label="LR sensitivity per_head − off")


def _fmt(x: float | None) -> str:
    return "no finite value" if x is None else f"{x:.3g}"


def _ratio_holds(off: float | None, on: float | None) -> bool:
    return off is not None and on is not None and off >= RATIO * on


def crit_b(results):
    if not all(results.full(arm=a, lr=TOP_LR) for a in ARMS):
        return judge.missing()
    off, on = logits_by_seed(results, "off", TOP_LR), logits_by_seed(results, "per_head", TOP_LR)
    ok = [s for s in off if _ratio_holds(off[s], on.get(s))]
    per_seed = ", ".join(f"seed {s}: off {_fmt(off[s])}, per_head {_fmt(on.get(s))}" for s in sorted(off))
    return judge.check(len(ok) == len(off), f"at LR {TOP_LR:g}, off >= {RATIO:g}x per_head in {len(ok)} of "
                                            f"{len(off)} seeds: {per_seed}")


def crit_c(results):
    return judge.all_of([judge.compare(results, {"arm": "per_head", "lr": lr}, {"arm": "off", "lr": lr}, "equivalent")
                         for lr in EQUIVALENT_AT])


def criteria(results):
    return [judge.criterion("(a)", "QK-norm's LR sensitivity better than off's", crit_a(results)),
            judge.criterion("(b)", "at LR 3e-1, max attention logit without QK-norm >= 10x with it, in every seed",
                            crit_b(results)),
            judge.criterion("(c)", "equivalent within 1% at LR 1e-3 and at LR 3e-3 (each)", crit_c(results))]


def plots(results, folder):
    return [report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="M, 6 layers: final val loss vs LR"),
            report.loss_vs_lr(results, folder, "max_attn_logit_vs_lr.png", key="probe.max_attn_logit", log_y=True,
                              ylabel="max attention logit (end)", title="max attention logit vs LR"),
            report.curves(results, folder, "max_attn_logit_curves.png", key="max_attn_logit", log_y=True,
                          title="max attention logit during training (all LRs, mean)")]


def key_number(results) -> str:
    vals = {a: list(logits_by_seed(results, a, TOP_LR).values()) for a in ARMS}
    if not all(vals.values()) or any(v is None for vs in vals.values() for v in vs):
        return ""
    return (f"max attn logit at LR {TOP_LR:g}: {stats.mean(vals['off']):.0f} without vs "
            f"{stats.mean(vals['per_head']):.1f} with")


CLAIM = Claim(
    number=11, name="c11_qk_norm", title="QK-norm prevents attention-logit growth and lowers LR sensitivity",
    lecture="Normalising queries and keys before the dot product bounds the attention logits; their growth is "
            "a known cause of divergence at high learning rates, and QK-norm makes training less sensitive to the LR.",
    references="Wortsman et al. 2023: qk-layernorm lowers LR sensitivity; a max attention logit above 1e4 always "
               "diverged.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number,
    setup="Model M with 6 layers; LR {1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1} x qk_norm {off, per_head} x 4 seeds, "
          "600 steps.",
    baseline={"arm": "off"},
)
