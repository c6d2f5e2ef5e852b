"""Claim 8: the shape conventions (d_ff = 4d for a plain MLP, heads x head_dim = d) are conventions: a wide
range of shapes performs alike at a fixed parameter count.

The lecture: d_ff = 4 d_model (plain MLP), n_heads x head_dim = d_model and aspect ratios d_model /
n_layers of roughly 100-200 are what models use, but Kaplan et al. (2020) found the loss nearly flat over
a wide range of shapes at a fixed non-embedding parameter count N: flat for d_ff/d from 1 to 4, +1.8% at
8, +4.8% at 25; aspect ratio flat over a wide range.

Test: every model has a non-embedding N within 15% of model S's (853,120), 3 seeds each:
  (a) a GELU MLP (plain, not gated) with d_ff/d_model in {1, 2, 4, 8, 16}, 4 layers, d_model chosen for N;
  (b) (n_layers, d_model) in {(1, 256), (2, 192), (4, 128), (8, 96), (16, 64)}, head_dim 32
      (n_heads = d_model / 32 = 8, 6, 4, 3, 2).

Criteria (fixed before any run; per-seed final validation losses, a diverged run counted as ln V):
  (a) d_ff/d = 4 is within 1% relative of the best ratio ((mean(4) − mean(best)) / mean(best) ≤ 0.01,
      the best ratio being the one with the lowest mean loss), and d_ff/d = 16 is worse than d_ff/d = 4
      (the protocol's comparison rule: Δ = mean(16) − mean(4) > max(2·SE, 0.01));
  (b) each of the shapes with 2, 4 and 8 layers is within 3% relative of the best shape, and the 1-layer
      shape is worse than the best by more than 3% relative (relative Δ > 0.03 and the comparison rule
      says "worse").

Choices the protocol left open, made here before any run and kept:
  - LR: every run uses the protocol's baseline LR 3e-3 (the claim gives no LR grid; the best LR may move
    with the shape, which this test does not follow).
  - (a): d_model is the multiple of 8 whose N (lecture3.accounting.param_counts, non_embedding) is closest
    to S's, at 4 layers: 192, 160, 136, 104, 80 for d_ff/d = 1, 2, 4, 8, 16 (N +3.9%, −3.8%, +4.2%, +1.5%,
    +8.1% vs S). Heads: head_dim 32 where d_model is a multiple of 32 (6 heads of 32 at d_ff/d = 1, 5 at
    d_ff/d = 2), else S's 4 heads (head_dims 34, 26, 20 at d_ff/d = 4, 8, 16). The GELU is the exact
    (erf) one; d_ff = ratio x d_model exactly.
  - (b): the MLP is S's (SwiGLU, the default 8/3 d_ff rounded up to a multiple of 64); N is −5.8%, +3.8%,
    0, +3.9%, +0.1% of S's. Every other choice is S's.
  - "within x% relative of B" is one-sided: A may be better than B by any amount.
"""

from __future__ import annotations

from lecture3 import accounting
from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, Criterion, RunSpec

LR = 3e-3
TOLERANCE = 0.15  # N within 15% of S's
# (a) d_ff / d_model -> (d_model, n_heads)
RATIOS = {1: (192, 6), 2: (160, 5), 4: (136, 4), 8: (104, 4), 16: (80, 4)}
# (b) (n_layers, d_model), head_dim 32
SHAPES = ((1, 256), (2, 192), (4, 128), (8, 96), (16, 64))
MIDDLE_SHAPES = ((2, 192), (4, 128), (8, 96))


def ratio_model(ratio: int):
    d, heads = RATIOS[ratio]
    return protocol.model_s(activation="gelu", d_model=d, d_ff=ratio * d, n_heads=heads)


def shape_model(layers: int, d: int):
    return protocol.model_s(n_layers=layers, d_model=d, n_heads=d // 32)


def ratio_arm(ratio: int) -> str:
    return f"ff{ratio}"


def shape_arm(layers: int, d: int) -> str:
    return f"L{layers}_d{d}"


def models() -> dict[str, object]:
    out = {ratio_arm(r): ratio_model(r) for r in RATIOS}
    out.update({shape_arm(*s): shape_model(*s) for s in SHAPES})
    return out


def param_match() -> dict[str, float]:
    """N / N_S − 1 of every arm (non-embedding parameters, from the config)."""
    base = accounting.param_counts(protocol.model_s())["non_embedding"]
    return {arm: accounting.param_counts(m)["non_embedding"] / base - 1 for arm, m in models().items()}


def check_param_match() -> None:
    bad = {arm: r for arm, r in param_match().items() if abs(r) > TOLERANCE}
    if bad:
        raise ValueError(f"c08: non-embedding params outside ±15% of S's: {bad}")


def runs(scale: str) -> list[RunSpec]:
    check_param_match()
    out = []
    for r in RATIOS:
        for seed in protocol.SEEDS:
            out.append(RunSpec(protocol.config(ratio_model(r), lr=LR, seed=seed, scale=scale),
                               {"arm": ratio_arm(r), "part": "a", "lr": LR, "seed": seed}))
    for s in SHAPES:
        for seed in protocol.SEEDS:
            out.append(RunSpec(protocol.config(shape_model(*s), lr=LR, seed=seed, scale=scale),
                               {"arm": shape_arm(*s), "part": "b", "lr": LR, "seed": seed}))
    return out


def _table(results, arms):
    if not all(results.full(arm=a) for a in arms):
        return None
    return {a: results.values(arm=a) for a in arms}


def _relative_to_best(table):
    best = min(table, key=lambda a: stats.mean(table[a]))
    mb = stats.mean(table[best])
    return best, {a: (stats.mean(v) - mb) / mb for a, v in table.items()}


def crit_a(results):
    table = _table(results, [ratio_arm(r) for r in RATIOS])
    if table is None:
        return judge.missing()
    best, rel = _relative_to_best(table)
    c = stats.compare(table[ratio_arm(16)], table[ratio_arm(4)])
    ok = rel[ratio_arm(4)] <= 0.01 and c.verdict == "worse"
    return ok, (f"best ratio {best}; d_ff/d = 4 is {100 * rel[ratio_arm(4)]:+.2f}% relative to it (≤ +1%: "
                f"{rel[ratio_arm(4)] <= 0.01}); ff16 − ff4: {c}")


def crit_b(results):
    table = _table(results, [shape_arm(*s) for s in SHAPES])
    if table is None:
        return judge.missing()
    best, rel = _relative_to_best(table)
    one = shape_arm(*SHAPES[0])
    c = stats.compare(table[one], table[best])
    middle_ok = all(rel[shape_arm(*s)] <= 0.03 for s in MIDDLE_SHAPES)
    one_ok = rel[one] > 0.03 and c.verdict == "worse"
    return middle_ok and one_ok, (
        f"best shape {best}; relative to it: " + ", ".join(f"{a} {100 * v:+.2f}%" for a, v in rel.items())
        + f"; 2-8 layers within 3%: {middle_ok}; {one} − best: {c}")


def criteria(results) -> list[Criterion]:
    return [judge.criterion("(a)", "d_ff/d = 4 within 1% relative of the best ratio; d_ff/d = 16 worse than 4",
                            crit_a(results)),
            judge.criterion("(b)", "shapes with 2–8 layers within 3% relative of the best; 1 layer worse than "
                            "the best by > 3% relative", crit_b(results))]


def plots(results, folder):
    figs = []
    a = [r for r in RATIOS if results.select(arm=ratio_arm(r))]
    if a:
        figs.append(report.bars([f"d_ff/d={r} (d {RATIOS[r][0]})" for r in a],
                                [results.values(arm=ratio_arm(r)) for r in a], folder, "loss_by_ratio.png",
                                "final val loss (nats)", "(a) GELU MLP, d_ff/d at fixed N (LR 3e-3)"))
    b = [s for s in SHAPES if results.select(arm=shape_arm(*s))]
    if b:
        figs.append(report.bars([f"{L} x {d}" for L, d in b], [results.values(arm=shape_arm(*s)) for s in b],
                                folder, "loss_by_shape.png", "final val loss (nats)",
                                "(b) layers x d_model at fixed N, head_dim 32 (LR 3e-3)"))
    return figs


def observations(results) -> list[str]:
    match = param_match()
    base = accounting.param_counts(protocol.model_s())["non_embedding"]
    return [f"non-embedding params vs S's {base:,} (config accounting): "
            + ", ".join(f"{arm} {100 * r:+.1f}%" for arm, r in match.items())]


def key_number(results) -> str:
    ta = _table(results, [ratio_arm(r) for r in RATIOS])
    tb = _table(results, [shape_arm(*s) for s in SHAPES])
    parts = []
    if ta is not None:
        best, rel = _relative_to_best(ta)
        parts.append(f"ff4 {100 * rel[ratio_arm(4)]:+.1f}% vs best ({best}), ff16 {100 * rel[ratio_arm(16)]:+.1f}%")
    if tb is not None:
        best, rel = _relative_to_best(tb)
        parts.append(f"1 layer {100 * rel[shape_arm(*SHAPES[0])]:+.1f}% vs best ({best})")
    return "; ".join(parts)


CLAIM = Claim(
    number=8, name="c08_shapes", title="shape conventions: a wide range of shapes performs alike at fixed N",
    lecture="d_ff = 4d (plain MLP), heads x head_dim = d and the usual aspect ratios are conventions: at a fixed "
            "non-embedding parameter count the loss is nearly flat over a wide range of MLP ratios and of "
            "depth vs width, and only extreme shapes cost.",
    references="Kaplan et al. 2020: loss flat for d_ff/d 1–4, +1.8% at 8, +4.8% at 25; aspect ratio flat over a "
               "wide range at fixed N.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number, observations=observations,
    setup="Non-embedding N within 15% of S's (853,120). (a) 4 layers, GELU MLP, d_ff/d in {1, 2, 4, 8, 16} with "
          "d_model 192, 160, 136, 104, 80 (heads 6, 5, 4, 4, 4: head_dim 32 where d_model allows, else 4 heads); "
          "(b) (layers, d_model) in {(1, 256), (2, 192), (4, 128), (8, 96), (16, 64)}, head_dim 32, S's SwiGLU. "
          "LR 3e-3 for every shape, 3 seeds.",
)
