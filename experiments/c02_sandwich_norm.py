"""Claim 2: a double (sandwich) norm adds stability (Grok, Gemma 2).

The lecture: some recent models (Grok, Gemma 2) normalise both the input and the output of each
sublayer ("sandwich" / double norm), reported to allow higher learning rates.

Test: model M with 6 layers, LR grid {1e-3, 3e-3, 1e-2, 3e-2, 1e-1}, sandwich vs pre, 3 seeds.

Criteria (fixed before any run):
  (a) sandwich has a lower LR sensitivity than pre in at least 2 of the 3 seeds (seed by seed);
  (b) sandwich's largest non-diverged LR is >= pre's;
  (c) the two are equal (the protocol's rule) at each one's best LR.

Choices made here: "largest non-diverged LR" is the largest LR of the grid at which no seed diverged;
the best LR of (c) is taken over this claim's 5-point grid.
"""

from __future__ import annotations

from lecture3.experiment import judge, protocol, report
from lecture3.experiment.spec import Claim, RunSpec

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
ARMS = ("pre", "sandwich")


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(protocol.model_m(n_layers=6, norm_position=arm), lr=lr, seed=seed, scale=scale),
                    {"arm": arm, "lr": lr, "seed": seed})
            for arm in ARMS for lr in LRS for seed in protocol.SEEDS]


def crit_a(results):
    table = judge.sensitivity_table(results, {a: {"arm": a} for a in ARMS})
    if table is None:
        return judge.missing()
    wins = sum(table["sandwich"][s] < table["pre"][s] for s in table["pre"])
    return wins >= 2, (f"sandwich lower in {wins}/3 seeds; sandwich {judge.fmt_per_seed(table['sandwich'])}; "
                       f"pre {judge.fmt_per_seed(table['pre'])}")


def crit_b(results):
    s, p = judge.largest_stable_lr(results, arm="sandwich"), judge.largest_stable_lr(results, arm="pre")
    if s is None or p is None:
        return judge.missing()
    return s >= p, f"largest LR with no diverged seed: sandwich {s:g}, pre {p:g}"


def criteria(results):
    return [
        judge.criterion("(a)", "lower LR sensitivity with sandwich in >= 2 of 3 seeds", crit_a(results)),
        judge.criterion("(b)", "sandwich's largest non-diverged LR >= pre's", crit_b(results)),
        judge.criterion("(c)", "equal loss at each one's best LR",
                        judge.equal_at_best_lr(results, {"arm": "sandwich"}, {"arm": "pre"})),
    ]


def plots(results, folder):
    return [report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="M, 6 layers: final val loss vs LR"),
            report.loss_vs_lr(results, folder, "max_attn_logit_vs_lr.png", key="probe.max_attn_logit",
                              ylabel="max attention logit (end)", log_y=True, title="max attention logit vs LR")]


def key_number(results) -> str:
    table = judge.sensitivity_table(results, {a: {"arm": a} for a in ARMS})
    if table is None:
        return ""
    m = {a: sum(v.values()) / len(v) for a, v in table.items()}
    return f"LR sensitivity: sandwich {m['sandwich']:.3f}, pre {m['pre']:.3f}"


CLAIM = Claim(
    number=2, name="c02_sandwich_norm", title="a double (sandwich) norm adds stability",
    lecture="Grok and Gemma 2 normalise both the input and the output of each sublayer (a 'sandwich' or "
            "double norm); the extra norms are meant to make training more stable at high learning rates.",
    references="Rybakov et al. 2024: extra norms allow about 1.5x higher learning rates.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number,
    setup="Model M (d_model 64) with 6 layers; LR {1e-3, 3e-3, 1e-2, 3e-2, 1e-1} x {pre, sandwich} x 3 seeds.",
)
