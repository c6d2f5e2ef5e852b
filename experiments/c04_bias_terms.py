"""Claim 4: bias terms can be dropped.

The lecture: modern transformers (PaLM, Llama, Gemma) drop the bias terms of every linear layer and of
the norms; they cost memory and were reported to hurt stability, while the loss does not need them.

Test (protocol v2): S without biases vs with q/k/v, output and MLP biases, LR {1e-3, 3e-3, 1e-2}, 4 seeds,
600 steps.

Criteria (claims.md, fixed before any run):
  (a) no-bias not worse than with-bias by more than 1% at each's best LR;
  (b) no-bias's LR sensitivity not worse by more than 0.01 nats.

Choices made here:
- The no-bias arm IS the baseline S: its runs are `protocol.baseline_specs(scale)` (the same configs, so
  the same keys and records as every claim that shares S's LR grid), tagged arm=no_bias here.
- The with-bias arm adds a bias to the q/k/v projections, the attention output projection and both MLP
  projections; lecture3's RMSNorm has no bias (a norm bias exists only for LayerNorm, `norm_bias`), so it
  keeps RMSNorm and the norm-bias part of the claim is not tested by this grid.
- (a) the margin is 1% of with-bias's mean loss at its best LR; (b) compares the per-seed LR
  sensitivity over the 3-point grid, paired by seed, with the non-inferior rule and m = 0.01 nats. The
  claim's baseline arm is no-bias.
"""

from __future__ import annotations

import dataclasses

from lecture3.experiment import judge, protocol, report
from lecture3.experiment.spec import Claim, RunSpec

WITH_BIAS = {"qkv_bias": True, "attn_out_bias": True, "mlp_bias": True}
SENSITIVITY_MARGIN = 0.01  # nats, (b)
NO, WITH = {"arm": "no_bias"}, {"arm": "with_bias"}


def runs(scale: str) -> list[RunSpec]:
    out = [dataclasses.replace(s, tags={**s.tags, "arm": "no_bias"}) for s in protocol.baseline_specs(scale)]
    out += [RunSpec(protocol.config(protocol.model_s(**WITH_BIAS), lr=lr, seed=seed, scale=scale),
                    {"arm": "with_bias", "lr": lr, "seed": seed})
            for lr in protocol.LRS for seed in protocol.SEEDS]
    return out


def crit_a(results):
    return judge.compare(results, NO, WITH, "not_worse", best_lr=True)


def crit_b(results):
    return judge.compare_sensitivity(results, NO, WITH, "not_worse", margin=SENSITIVITY_MARGIN,
                                     label="LR sensitivity no-bias − with-bias")


def criteria(results):
    return [
        judge.criterion("(a)", "no-bias not worse than with-bias by more than 1% at each's best LR", crit_a(results)),
        judge.criterion("(b)", f"no-bias's LR sensitivity not worse than with-bias's by more than "
                        f"{SENSITIVITY_MARGIN:g} nats", crit_b(results)),
    ]


def plots(results, folder):
    return [report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="final val loss vs peak LR")]


def key_number(results) -> str:
    out, detail, comps = crit_a(results)
    return "" if out is None else f"Δ(no − with bias) = {comps[0][1].d:+.3f} nats at each's best LR"


CLAIM = Claim(
    number=4, name="c04_bias_terms", title="bias terms can be dropped",
    lecture="Modern transformers drop the biases of linear layers and norms (PaLM, Llama): the loss does "
            "not need them, and dropping them saves memory and helps stability.",
    references="Qualitative: memory and stability (PaLM, Chowdhery et al. 2022).",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number, baseline=NO,
    setup=f"Model S without biases (the baseline's runs) vs with q/k/v, attention-output and MLP biases (RMSNorm "
          f"has no bias in lecture3); LR {{1e-3, 3e-3, 1e-2}} x {len(protocol.SEEDS)} seeds, {protocol.STEPS} steps.",
)
