"""Claim 11: QK-norm prevents attention-logit growth and lowers LR sensitivity.

The lecture: normalising queries and keys before their dot product (Dehghani et al. 2023; OLMo 2,
Gemma 3) bounds the attention logits, whose growth is a known cause of divergence at high LR.

Test: model M with 6 layers, LR {1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1}, qk_norm off vs per_head, 3 seeds.

Criteria (fixed before any run):
  (a) QK-norm has a lower LR sensitivity than no QK-norm in every seed (seed by seed);
  (b) at the highest LR (3e-1), the max attention logit without QK-norm is >= 10x the one with it;
  (c) the two are equal (the protocol's rule) at LR 1e-3 and at LR 3e-3.

Choices made here: the max attention logit of a run is the largest q·k logit (after the query scale,
before any cap, bias or mask) over layers and heads on the first validation batch at the end of
training; for a run that diverged (no final params) it is the last finite value logged during training
(the same quantity on the training batch). (b) compares the means over the 3 seeds.
"""

from __future__ import annotations

import math

from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, RunSpec

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
ARMS = {"off": None, "per_head": "per_head"}


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(protocol.model_m(n_layers=6, qk_norm=q), lr=lr, seed=seed, scale=scale),
                    {"arm": arm, "lr": lr, "seed": seed})
            for arm, q in ARMS.items() for lr in LRS for seed in protocol.SEEDS]


def max_logit(rec) -> float | None:
    p = rec["result"].get("probe")
    if p is not None:
        return p["max_attn_logit"]
    logged = [r["max_attn_logit"] for r in rec["result"]["history"]
              if r.get("max_attn_logit") is not None and math.isfinite(r["max_attn_logit"])]
    return logged[-1] if logged else None


def crit_a(results):
    table = judge.sensitivity_table(results, {a: {"arm": a} for a in ARMS})
    if table is None:
        return judge.missing()
    wins = sum(table["per_head"][s] < table["off"][s] for s in table["off"])
    return wins == len(table["off"]), (f"QK-norm lower in {wins}/{len(table['off'])} seeds; per_head "
                                       f"{judge.fmt_per_seed(table['per_head'])}; "
                                       f"off {judge.fmt_per_seed(table['off'])}")


def crit_b(results):
    lr = max(LRS)
    if not all(results.full(arm=a, lr=lr) for a in ARMS):
        return judge.missing()
    vals = {a: [max_logit(r) for _, r in results.select(arm=a, lr=lr)] for a in ARMS}
    if any(v is None for vs in vals.values() for v in vs):
        return False, f"a run logged no finite attention logit: {vals}"
    off, on = stats.mean(vals["off"]), stats.mean(vals["per_head"])
    return off >= 10 * on, (f"mean max attention logit at LR {lr:g}: off {off:.1f}, per_head {on:.2f} "
                            f"(ratio {off / on:.1f}x)")


def crit_c(results):
    parts, ok = [], True
    for lr in (1e-3, 3e-3):
        if not all(results.full(arm=a, lr=lr) for a in ARMS):
            return judge.missing()
        c = stats.compare(results.values(arm="per_head", lr=lr), results.values(arm="off", lr=lr))
        ok &= c.verdict == "equal"
        parts.append(f"LR {lr:g}: per_head − off {c}")
    return ok, "; ".join(parts)


def criteria(results):
    return [judge.criterion("(a)", "lower LR sensitivity with QK-norm in every seed", crit_a(results)),
            judge.criterion("(b)", "at the highest LR, max attention logit without QK-norm >= 10x with it",
                            crit_b(results)),
            judge.criterion("(c)", "equal loss at LR <= 3e-3", crit_c(results))]


def plots(results, folder):
    return [report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="M, 6 layers: final val loss vs LR"),
            report.loss_vs_lr(results, folder, "max_attn_logit_vs_lr.png", key="probe.max_attn_logit", log_y=True,
                              ylabel="max attention logit (end)", title="max attention logit vs LR"),
            report.curves(results, folder, "max_attn_logit_curves.png", key="max_attn_logit", log_y=True,
                          title="max attention logit during training (all LRs, mean)")]


def key_number(results) -> str:
    lr = max(LRS)
    vals = {a: [max_logit(r) for _, r in results.select(arm=a, lr=lr)] for a in ARMS}
    if not all(vals.values()) or any(v is None for vs in vals.values() for v in vs):
        return ""
    return (f"max attn logit at LR {lr:g}: {stats.mean(vals['off']):.0f} without vs "
            f"{stats.mean(vals['per_head']):.1f} with")


CLAIM = Claim(
    number=11, name="c11_qk_norm", title="QK-norm prevents attention-logit growth and lowers LR sensitivity",
    lecture="Normalising queries and keys before the dot product bounds the attention logits; their growth is "
            "a known cause of divergence at high learning rates, and QK-norm makes training less sensitive to the LR.",
    references="Wortsman et al. 2023: qk-layernorm lowers LR sensitivity; a max attention logit above 1e4 always "
               "diverged.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number,
    setup="Model M with 6 layers; LR {1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1} x qk_norm {off, per_head} x 3 seeds.",
)
