"""Claim 5: GLUs beat plain activations at matched parameters; SwiGLU is the default since 2023.

The lecture: gated linear units (ReGLU, GeGLU, SwiGLU) consistently beat plain ReLU / GELU MLPs at the
same parameter count, with the hidden size cut to 2/3 to pay for the third matrix.

Test: model S with relu, gelu, silu, relu2 (d_ff = 4d = 512) and reglu, geglu, swiglu (d_ff = 8/3 d =
341, so three matrices of d x 341 match two of d x 512), at the baseline's LR, 3 seeds each.

Criteria (fixed before any run):
  (a) the parameter counts of all seven are within 1% of each other;
  (b) swiglu is better than relu (the protocol's comparison rule);
  (c) the mean over the gated variants is better than the mean over the plain ones (the rule applied to
      all gated runs against all plain runs, so its SE is over all of them).

Choices made here: "the baseline's best LR" is taken as 3e-3, lecture3's default and the middle of the
protocol's grid (claim 4's no-bias arm, which is S itself, measures S's best LR over the 3-point grid);
d_ff = 341 = floor(8/3 x 128) for the gated variants rather than the 8/3 rule rounded up to 384, because
the criterion is matched parameters.
"""

from __future__ import annotations

from lecture3 import accounting
from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, RunSpec

LR = 3e-3
PLAIN = ("relu", "gelu", "silu", "relu2")
GATED = ("reglu", "geglu", "swiglu")


def model(act: str):
    d = 128
    return protocol.model_s(activation=act, d_ff=4 * d if act in PLAIN else (8 * d) // 3)


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(model(act), lr=LR, seed=seed, scale=scale),
                    {"arm": act, "gated": act in GATED, "seed": seed})
            for act in PLAIN + GATED for seed in protocol.SEEDS]


def param_counts(scale: str = "cpu") -> dict[str, int]:
    out = {}
    for spec in runs(scale):
        out.setdefault(spec.tags["arm"], accounting.param_counts(spec.config.model)["total"])
    return out


def crit_a(results):
    counts = {}
    for spec, rec in results.rows:
        counts.setdefault(spec.tags["arm"], rec["result"].get("params"))
    if len(counts) < len(PLAIN + GATED) or None in counts.values():
        return judge.missing()
    lo, hi = min(counts.values()), max(counts.values())
    return (hi - lo) / lo <= 0.01, f"params {counts}; spread {100 * (hi - lo) / lo:.2f}%"


def crit_b(results):
    if not (results.full(arm="swiglu") and results.full(arm="relu")):
        return judge.missing()
    c = stats.compare(results.values(arm="swiglu"), results.values(arm="relu"))
    return c.verdict == "better", f"swiglu − relu: {c}"


def crit_c(results):
    if not all(results.full(arm=a) for a in PLAIN + GATED):
        return judge.missing()
    gated = [v for a in GATED for v in results.values(arm=a)]
    plain = [v for a in PLAIN for v in results.values(arm=a)]
    c = stats.compare(gated, plain)
    return c.verdict == "better", f"gated − plain (all runs): {c}"


def criteria(results):
    return [
        judge.criterion("(a)", "parameter counts within 1%", crit_a(results)),
        judge.criterion("(b)", "swiglu better than relu", crit_b(results)),
        judge.criterion("(c)", "mean over gated better than mean over plain", crit_c(results)),
    ]


def plots(results, folder):
    arms = list(PLAIN + GATED)
    return [report.bars(arms, [results.values(arm=a) for a in arms], folder, "loss_by_activation.png",
                        "final val loss", "S at LR 3e-3: final val loss by activation (plain | gated)")]


def key_number(results) -> str:
    if not (results.full(arm="swiglu") and results.full(arm="relu")):
        return ""
    return f"swiglu {stats.mean(results.values(arm='swiglu')):.3f} vs relu {stats.mean(results.values(arm='relu')):.3f}"


CLAIM = Claim(
    number=5, name="c05_glu_activations", title="GLUs beat plain activations at matched parameters",
    lecture="Gated linear units (ReGLU, GeGLU, SwiGLU) beat plain ReLU / GELU MLPs at the same parameter count "
            "(hidden size cut to 2/3 for the third matrix); SwiGLU has been the default since about 2023.",
    references="Shazeer 2020 (T5-base, 65k steps): ReLU 1.997, GELU 1.983, Swish 1.994, GEGLU 1.942, SwiGLU "
               "1.944, ReGLU 1.953; Narang et al. 2021: SwiGLU 1.789 vs ReLU 1.838.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number,
    setup="Model S with seven MLP activations at LR 3e-3, 3 seeds each; plain d_ff 512, gated d_ff 341.",
)
