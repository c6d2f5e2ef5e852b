"""The shared measures of the experiments protocol, as pure functions of per-seed numbers.

Every rule here is the one `experiments/README.md` states (the protocol, fixed before any run):

  compare     Δ = mean(A) − mean(B), SE = sqrt(var(A)/n_A + var(B)/n_B) with sample variances; A is
              "better" when Δ < −max(2·SE, 0.01), "worse" when Δ > max(2·SE, 0.01), else "equal"
  best_lr     the LR of a grid with the lowest mean final loss
  diverged    the loss became non-finite, or ended above the loss at init (ln V)
  lr_sensitivity (Wortsman et al. 2023, §2.2): over an LR grid, the mean of min(L(η), L0) − L*, with L0
              the loss at init and L* the best loss over the grid; a diverged run counts as L0
  verdict     reproduced (every criterion passes), partly reproduced (some), not reproduced (none)
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

MIN_GAP = 0.01  # nats: a difference smaller than this is "equal" however small the SE


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The protocol's comparison of A against B (per-seed final losses)."""

    delta: float  # mean(A) - mean(B)
    se: float
    verdict: str  # better | worse | equal  (A relative to B; lower loss is better)
    mean_a: float
    mean_b: float

    @property
    def threshold(self) -> float:
        return max(2 * self.se, MIN_GAP)

    @property
    def relative(self) -> float:
        """Δ / mean(B)."""
        return self.delta / self.mean_b

    def __str__(self) -> str:
        return (f"Δ = {self.delta:+.4f} (SE {self.se:.4f}, threshold ±{self.threshold:.4f}, "
                f"relative {100 * self.relative:+.2f}%): {self.verdict}")


def mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs))


def sample_var(xs: Sequence[float]) -> float:
    return float(statistics.variance(xs)) if len(xs) > 1 else 0.0


def std(xs: Sequence[float]) -> float:
    return math.sqrt(sample_var(xs))


def compare(a: Sequence[float], b: Sequence[float], min_gap: float = MIN_GAP) -> Comparison:
    """A vs B by the protocol's rule. Needs at least one value on each side (a single value has SE 0)."""
    if not a or not b:
        raise ValueError(f"compare needs values on both sides, got {len(a)} and {len(b)}")
    ma, mb = mean(a), mean(b)
    delta = ma - mb
    se = math.sqrt(sample_var(a) / len(a) + sample_var(b) / len(b))
    gap = max(2 * se, min_gap)
    verdict = "better" if delta < -gap else "worse" if delta > gap else "equal"
    return Comparison(delta=delta, se=se, verdict=verdict, mean_a=ma, mean_b=mb)


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


def verdict(passed: Sequence[bool | None]) -> str:
    """reproduced | partly reproduced | not reproduced; `incomplete` while any criterion cannot be judged."""
    if not passed or any(p is None for p in passed):
        return "incomplete"
    if all(passed):
        return "reproduced"
    return "partly reproduced" if any(passed) else "not reproduced"


def fmt_mean_std(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    return f"{mean(xs):.4f} ± {std(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"
