"""Claim 2: a double (sandwich) norm adds stability (Grok, Gemma 2).

The lecture: some recent models (Grok, Gemma 2) normalise both the input and the output of each
sublayer ("sandwich" / double norm), reported to allow higher learning rates.

Test (protocol v2): model M with 6 layers, LR {1e-3, 3e-3, 1e-2, 3e-2, 1e-1}, sandwich vs pre, 4 seeds,
600 steps.

Criteria (claims.md, fixed before any run):
  (a) sandwich's LR sensitivity better than pre's;
  (b) the largest LR at which no seed diverges is >= pre's;
  (c) equivalent within 1% at each's best LR.

Choices made here: (a) compares the per-seed LR sensitivity (nats, over this claim's 5-point grid)
paired by seed with the *better* rule; (b) is deterministic (pass or fail), and an arm with every LR
diverged has largest stable LR 0; the best LR of (c) is each arm's over this claim's 5-point grid, the
margin 1% of pre's mean loss there. The claim's baseline arm is pre, at its best LR.
"""

from __future__ import annotations

from lecture3.experiment import judge, protocol, report
from lecture3.experiment.spec import Claim, RunSpec

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
ARMS = ("pre", "sandwich")
PRE, SANDWICH = {"arm": "pre"}, {"arm": "sandwich"}


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(protocol.model_m(n_layers=6, norm_position=arm), lr=lr, seed=seed, scale=scale),
                    {"arm": arm, "lr": lr, "seed": seed})
            for arm in ARMS for lr in LRS for seed in protocol.SEEDS]


def crit_a(results):
    return judge.compare_sensitivity(results, SANDWICH, PRE, "better", label="LR sensitivity sandwich − pre")


def crit_b(results):
    s, p = judge.largest_stable_lr(results, **SANDWICH), judge.largest_stable_lr(results, **PRE)
    if s is None or p is None:
        return judge.missing()
    return judge.check(s >= p, f"largest LR with no diverged seed: sandwich {s:g}, pre {p:g}")


def crit_c(results):
    return judge.compare(results, SANDWICH, PRE, "equivalent", best_lr=True)


def criteria(results):
    return [
        judge.criterion("(a)", "sandwich's LR sensitivity better than pre's", crit_a(results)),
        judge.criterion("(b)", "the largest LR at which no seed diverges: sandwich's >= pre's", crit_b(results)),
        judge.criterion("(c)", "sandwich equivalent to pre within 1% at each's best LR", crit_c(results)),
    ]


def plots(results, folder):
    return [report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="M, 6 layers: final val loss vs LR"),
            report.loss_vs_lr(results, folder, "max_attn_logit_vs_lr.png", key="probe.max_attn_logit",
                              ylabel="max attention logit (end)", log_y=True, title="max attention logit vs LR")]


def key_number(results) -> str:
    s, p = judge.mean_sensitivity(results, **SANDWICH), judge.mean_sensitivity(results, **PRE)
    return "" if s is None or p is None else f"LR sensitivity: sandwich {s:.3f}, pre {p:.3f}"


CLAIM = Claim(
    number=2, name="c02_sandwich_norm", title="a double (sandwich) norm adds stability",
    lecture="Grok and Gemma 2 normalise both the input and the output of each sublayer (a 'sandwich' or "
            "double norm); the extra norms are meant to make training more stable at high learning rates.",
    references="Rybakov et al. 2024: extra norms allow about 1.5x higher learning rates.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number, baseline=PRE,
    setup=f"Model M (d_model 64) with 6 layers; LR {{1e-3, 3e-3, 1e-2, 3e-2, 1e-1}} x {{pre, sandwich}} x "
          f"{len(protocol.SEEDS)} seeds, {protocol.STEPS} steps.",
)
