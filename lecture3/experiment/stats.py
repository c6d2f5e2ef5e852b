"""The shared measures of the experiments protocol (v2), as pure functions of per-seed numbers.

Every rule here is the one `experiments/README.md` states (the protocol, fixed before any run):

  paired      A against B, paired by seed: d_s = A(s) - B(s), d = mean(d_s), SE = sd(d_s)/sqrt(n),
              CI = d +- t(0.975, n-1)·SE. Lower is better. A statement is one of
                better      A better than B:             pass CI_high < 0;           fail CI_low >= 0
                equivalent  A equivalent to B within m:   pass -m < CI_low, CI_high < m;
                                                          fail CI_low > m or CI_high < -m
                not_worse   A not worse than B by > m:    pass CI_high < m;           fail CI_low > m
                worse       A worse than B by more than m: pass CI_low > m;           fail CI_high < m
              and anything else is inconclusive. m defaults to 1% of mean(B).
  best_lr     the LR of a grid with the lowest mean final loss
  diverged    the loss became non-finite, or ended above the loss at init (ln V)
  lr_sensitivity (Wortsman et al. 2023, §2.2): over an LR grid, the mean of min(L(η), L0) − L*, with L0
              the loss at init and L* the best loss over the grid; a diverged run counts as L0
  verdict     reproduced (all pass), partly reproduced (>= 1 pass and >= 1 fail), not reproduced (none
              passes, >= 1 fails), inconclusive (none fails, >= 1 inconclusive); incomplete while runs miss
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections.abc import Mapping, Sequence

KINDS = ("better", "equivalent", "not_worse", "worse")
OUTCOMES = ("pass", "fail", "inconclusive")
MARGIN_FRACTION = 0.01  # the default margin: 1% of mean(B)
KIND_WORDS = {"better": "better than", "equivalent": "equivalent to", "not_worse": "not worse than",
              "worse": "worse by more than the margin than"}


@functools.cache
def t_quantile(n: int, p: float = 0.975) -> float:
    """Student's t quantile with n - 1 degrees of freedom (t(0.975, 3) = 3.182 for n = 4)."""
    from scipy.stats import t

    return float(t.ppf(p, n - 1))


@dataclasses.dataclass(frozen=True)
class Paired:
    """A paired comparison of A against B (or a per-seed quantity against 0) and its outcome."""

    kind: str  # one of KINDS
    seeds: tuple  # the seeds, in order
    diffs: tuple[float, ...]  # d_s = A(s) - B(s)
    margin: float  # m, in `unit` (0 for "better")
    reference: float  # mean(B): what `relative` divides by (nan: none)
    unit: str = "nats"
    label: str = "A − B"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"comparison kind {self.kind!r} is invalid: expected one of {KINDS}")
        if len(self.diffs) < 2:
            raise ValueError(f"a paired comparison needs >= 2 seeds, got {len(self.diffs)}")

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def d(self) -> float:
        return float(statistics.fmean(self.diffs))

    @property
    def se(self) -> float:
        return float(statistics.stdev(self.diffs)) / math.sqrt(self.n)

    @property
    def half_width(self) -> float:
        return t_quantile(self.n) * self.se

    @property
    def ci(self) -> tuple[float, float]:
        return self.d - self.half_width, self.d + self.half_width

    @property
    def relative(self) -> float:
        """d / mean(B) (nan without a reference)."""
        return self.d / self.reference if self.reference and math.isfinite(self.reference) else math.nan

    @property
    def outcome(self) -> str:
        return outcome(self.kind, *self.ci, self.margin)

    def __str__(self) -> str:
        lo, hi = self.ci
        rel = "" if math.isnan(self.relative) else f", relative {100 * self.relative:+.2f}%"
        margin = "" if self.kind == "better" else f", margin {self.margin:.4f}"
        per_seed = ", ".join(f"{x:+.4f}" for x in self.diffs)
        return (f"{self.label} = {self.d:+.4f} {self.unit} [95% CI {lo:+.4f}, {hi:+.4f}; n {self.n}{margin}"
                f"{rel}; per seed {per_seed}]: {self.outcome}")


def outcome(kind: str, lo: float, hi: float, margin: float = 0.0) -> str:
    """pass / fail / inconclusive of a statement `kind` with the interval [lo, hi] and margin m."""
    m = margin
    if kind == "better":
        return "pass" if hi < 0 else "fail" if lo >= 0 else "inconclusive"
    if kind == "equivalent":
        return "pass" if -m < lo and hi < m else "fail" if lo > m or hi < -m else "inconclusive"
    if kind == "not_worse":
        return "pass" if hi < m else "fail" if lo > m else "inconclusive"
    if kind == "worse":
        return "pass" if lo > m else "fail" if hi < m else "inconclusive"
    raise ValueError(f"comparison kind {kind!r} is invalid: expected one of {KINDS}")


def paired(a: Mapping, b: Mapping, kind: str, *, margin: float | None = None,
           margin_fraction: float = MARGIN_FRACTION, unit: str = "nats", label: str = "A − B") -> Paired:
    """A against B paired by seed (`a`, `b`: seed -> value, the same seeds). The margin is `margin` if
    given, else `margin_fraction` of mean(B) ("better" has none)."""
    if set(a) != set(b):
        raise ValueError(f"paired comparison needs the same seeds on both sides, got {sorted(a)} and {sorted(b)}")
    seeds = tuple(sorted(a))
    ref = mean([b[s] for s in seeds])
    if margin is None:
        margin = 0.0 if kind == "better" else margin_fraction * abs(ref)
    return Paired(kind, seeds, tuple(float(a[s]) - float(b[s]) for s in seeds), float(margin), ref, unit, label)


def of_diffs(diffs: Mapping, kind: str, *, margin: float = 0.0, reference: float = math.nan,
             unit: str = "nats", label: str = "d") -> Paired:
    """The same rules on a per-seed quantity itself (a gap, a difference of gaps, a log-logit) against 0."""
    seeds = tuple(sorted(diffs))
    return Paired(kind, seeds, tuple(float(diffs[s]) for s in seeds), float(margin), reference, unit, label)


def mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs))


def sample_var(xs: Sequence[float]) -> float:
    return float(statistics.variance(xs)) if len(xs) > 1 else 0.0


def std(xs: Sequence[float]) -> float:
    return math.sqrt(sample_var(xs))


def best_lr(losses_by_lr: Mapping[float, Sequence[float]]) -> float:
    """The LR whose mean loss is lowest (ties: the smaller LR)."""
    return min(sorted(losses_by_lr), key=lambda lr: mean(losses_by_lr[lr]))


def is_diverged(losses: Sequence[float], initial: float) -> bool:
    """Non-finite at some logged step, or the final value above `initial` (ln V for a fresh model)."""
    return any(not math.isfinite(x) for x in losses) or (bool(losses) and losses[-1] > initial)


def lr_sensitivity(losses_by_lr: Mapping[float, float | None], initial: float) -> float:
    """Wortsman et al. (2023) LR sensitivity of ONE seed: mean over the grid of min(L(η), L0) − L*.

    `losses_by_lr` maps each LR to that seed's final loss, None (or non-finite) for a diverged run,
    which counts as L0 = `initial`. L* is the best loss over the grid.
    """
    vals = [initial if (v is None or not math.isfinite(v)) else min(v, initial) for v in losses_by_lr.values()]
    best = min(vals)
    return mean([v - best for v in vals])


def verdict(outcomes: Sequence[str | None]) -> str:
    """The claim's verdict from its criteria's outcomes (None: runs missing)."""
    if not outcomes or any(o is None for o in outcomes):
        return "incomplete"
    bad = [o for o in outcomes if o not in OUTCOMES]
    if bad:
        raise ValueError(f"criterion outcome {bad[0]!r} is invalid: expected one of {OUTCOMES}")
    passes, fails = outcomes.count("pass"), outcomes.count("fail")
    if passes == len(outcomes):
        return "reproduced"
    if passes and fails:
        return "partly reproduced"
    if fails:
        return "not reproduced"
    return "inconclusive"


def fmt_mean_std(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    return f"{mean(xs):.4f} ± {std(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"
