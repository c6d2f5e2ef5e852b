"""Claim 4: bias terms can be dropped.

The lecture: modern transformers (PaLM, Llama, Gemma) drop the bias terms of every linear layer and of
the norms; they cost memory and were reported to hurt stability, while the loss does not need them.

Test: model S without biases (the baseline) vs S with biases on the q/k/v projections, the attention
output projection and both MLP projections, each over the 3-point LR grid {1e-3, 3e-3, 1e-2} x 3 seeds.

Criteria (fixed before any run):
  (a) the two are equal (the protocol's comparison rule) at each one's best LR;
  (b) the LR sensitivity over the 3-point grid of no-bias is at most with-bias's + 0.01 (mean over seeds).

Choice made here: lecture3's RMSNorm has no bias (a bias is only defined for LayerNorm, `norm_bias`), so
the with-bias arm keeps RMSNorm without a norm bias and adds every projection bias; the norm-bias part
of the claim is not tested by this grid.
"""

from __future__ import annotations

from lecture3.experiment import protocol, report, stats
from lecture3.experiment.spec import Claim, Criterion, RunSpec

ARMS = {
    "no_bias": {},
    "with_bias": {"qkv_bias": True, "attn_out_bias": True, "mlp_bias": True},
}


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(protocol.model_s(**changes), lr=lr, seed=seed, scale=scale),
                    {"arm": arm, "lr": lr, "seed": seed})
            for arm, changes in ARMS.items() for lr in protocol.LRS for seed in protocol.SEEDS]


def criteria(results) -> list[Criterion]:
    out = []
    best = {arm: results.best_lr(arm=arm) for arm in ARMS}
    text_a = "no-bias and with-bias equal at each one's best LR"
    if None in best.values():
        out.append(Criterion("(a)", text_a, None, ""))
    else:
        c = stats.compare(results.values(arm="no_bias", lr=best["no_bias"]),
                          results.values(arm="with_bias", lr=best["with_bias"]))
        out.append(Criterion("(a)", text_a, c.verdict == "equal",
                             f"best LR no-bias {best['no_bias']:g}, with-bias {best['with_bias']:g}; no-bias − "
                             f"with-bias: {c}"))
    text_b = "LR sensitivity (3-point grid) of no-bias ≤ with-bias + 0.01"
    if not all(results.full(arm=arm) for arm in ARMS):
        out.append(Criterion("(b)", text_b, None, ""))
    else:
        sens = {arm: stats.mean(list(results.sensitivity_per_seed(arm=arm).values())) for arm in ARMS}
        out.append(Criterion("(b)", text_b, sens["no_bias"] <= sens["with_bias"] + 0.01,
                             f"mean sensitivity no-bias {sens['no_bias']:.4f}, with-bias {sens['with_bias']:.4f}"))
    return out


def plots(results, folder):
    return [report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="final val loss vs peak LR")]


def key_number(results) -> str:
    best = {arm: results.best_lr(arm=arm) for arm in ARMS}
    if None in best.values():
        return ""
    c = stats.compare(results.values(arm="no_bias", lr=best["no_bias"]),
                      results.values(arm="with_bias", lr=best["with_bias"]))
    return f"Δ(no − with bias) = {c.delta:+.3f} nats"


CLAIM = Claim(
    number=4, name="c04_bias_terms", title="bias terms can be dropped",
    lecture="Modern transformers drop the biases of linear layers and norms (PaLM, Llama): the loss does "
            "not need them, and dropping them saves memory and helps stability.",
    references="Qualitative: memory and stability (PaLM, Chowdhery et al. 2022).",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number,
    setup="Model S with and without q/k/v, attention-output and MLP biases (RMSNorm has no bias in lecture3); "
          "LR grid {1e-3, 3e-3, 1e-2}.",
)
