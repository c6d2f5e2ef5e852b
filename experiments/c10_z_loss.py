"""Claim 10: z-loss keeps the softmax normaliser near 0 and prevents output-logit divergence.

The lecture: PaLM adds 1e-4 · log² Z to the loss, which keeps log Z of the output softmax near 0 and so
the output logits from drifting; Wortsman et al. reproduce the divergence it prevents in small models.

Test: model M, weight decay 0, LR {1e-2, 3e-2, 1e-1}, z-loss off vs 1e-4, 3 seeds, 600 steps (2x claim 1's).

Criteria (fixed before any run):
  (a) with z-loss, mean |log Z| (over the tokens of the first validation batch) is < 1 at the end, for
      every LR and seed;
  (b) without it, at the highest LR (1e-1), mean |log Z| > 5 or a worse final loss than with z-loss
      (same seed), in at least 2 of the 3 seeds.

Choices made here: a run that diverged (non-finite) has no final |log Z|: it fails (a) if it had z-loss,
and counts for (b) as worse if it had none (its loss counts as ln V).
"""

from __future__ import annotations

from lecture3.experiment import judge, protocol, report
from lecture3.experiment.spec import Claim, RunSpec

LRS = (1e-2, 3e-2, 1e-1)
ZS = {"off": None, "1e-4": 1e-4}
STEPS = 2 * protocol.STEPS


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(protocol.model_m(), lr=lr, seed=seed, steps=STEPS, scale=scale,
                                    weight_decay=0.0, z_loss=z),
                    {"arm": f"z_loss={name}", "lr": lr, "seed": seed})
            for name, z in ZS.items() for lr in LRS for seed in protocol.SEEDS]


def _logz(rec):
    p = rec["result"].get("probe")
    return None if p is None else p["log_z_abs"]


def crit_a(results):
    if not results.full(arm="z_loss=1e-4"):
        return judge.missing()
    vals = {(s.tags["lr"], s.tags["seed"]): _logz(r) for s, r in results.select(arm="z_loss=1e-4")}
    ok = all(v is not None and v < 1 for v in vals.values())
    worst = max((v for v in vals.values() if v is not None), default=float("nan"))
    return ok, f"largest mean |log Z| with z-loss {worst:.3f}; runs without a value (diverged): " \
               f"{sum(v is None for v in vals.values())}"


def crit_b(results):
    lr = max(LRS)
    if not (results.full(arm="z_loss=off", lr=lr) and results.full(arm="z_loss=1e-4", lr=lr)):
        return judge.missing()
    off = {s.tags["seed"]: r for s, r in results.select(arm="z_loss=off", lr=lr)}
    on = {s.tags["seed"]: r for s, r in results.select(arm="z_loss=1e-4", lr=lr)}
    hits, parts = 0, []
    for seed in sorted(off):
        z = _logz(off[seed])
        worse = off[seed]["result"]["final_loss"] > on[seed]["result"]["final_loss"]
        hit = (z is None) or z > 5 or worse
        hits += hit
        parts.append(f"seed {seed}: |log Z| {'–' if z is None else f'{z:.2f}'}, loss off "
                     f"{off[seed]['result']['final_loss']:.4f} vs on {on[seed]['result']['final_loss']:.4f}")
    return hits >= 2, f"{hits}/3 seeds; " + "; ".join(parts)


def criteria(results):
    return [judge.criterion("(a)", "with z-loss, mean |log Z| < 1 at the end for every LR and seed", crit_a(results)),
            judge.criterion("(b)", "without it at LR 0.1, |log Z| > 5 or worse loss in >= 2 of 3 seeds",
                            crit_b(results))]


def plots(results, folder):
    return [report.loss_vs_lr(results, folder, "log_z_vs_lr.png", key="probe.log_z_abs", ylabel="mean |log Z| (end)",
                              title="M, WD 0: mean |log Z| vs LR"),
            report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="M, WD 0: final val loss vs LR"),
            report.curves(results, folder, "log_z_curves.png", key="log_z_abs", title="|log Z| during training "
                          "(all LRs, mean)")]


def key_number(results) -> str:
    rows = [(_logz(r), s.tags["arm"]) for s, r in results.select(lr=max(LRS))]
    off = [z for z, a in rows if a == "z_loss=off" and z is not None]
    on = [z for z, a in rows if a == "z_loss=1e-4" and z is not None]
    if not off or not on:
        return ""
    return f"|log Z| at LR 0.1: {sum(off) / len(off):.2f} without, {sum(on) / len(on):.2f} with z-loss"


CLAIM = Claim(
    number=10, name="c10_z_loss", title="z-loss keeps log Z near 0 and prevents output-logit divergence",
    lecture="PaLM adds 1e-4 · log² Z to the loss: it keeps the log-normaliser of the output softmax near zero, "
            "and with it the output logits from drifting until training diverges.",
    references="PaLM: weight 1e-4; Wortsman et al. 2023: output-logit divergence in a 2.4M model at LR 0.1 "
               "without weight decay, fixed by z-loss.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number,
    setup="Model M, WD 0, LR {1e-2, 3e-2, 1e-1} x z-loss {off, 1e-4} x 3 seeds, 600 steps.",
)
