"""Building blocks of the claims' criteria: each returns (passed, detail) or (None, why) when the runs it
needs are not all recorded, so a criterion is judged only on complete evidence."""

from __future__ import annotations

from lecture3.experiment import stats
from lecture3.experiment.spec import Criterion, Results


def criterion(name: str, text: str, outcome: tuple[bool | None, str]) -> Criterion:
    return Criterion(name, text, outcome[0], outcome[1])


def missing(what: str = "") -> tuple[None, str]:
    return None, f"runs missing{': ' + what if what else ''}"


def _label(tags: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in tags.items())


def compare_at_best_lr(results: Results, a: dict, b: dict) -> stats.Comparison | None:
    """A vs B, each at its own best LR (the protocol's rule), or None while runs are missing."""
    la, lb = results.best_lr(**a), results.best_lr(**b)
    if la is None or lb is None:
        return None
    return stats.compare(results.values(lr=la, **a), results.values(lr=lb, **b))


def equal_at_best_lr(results: Results, a: dict, b: dict, allowed=("equal",)) -> tuple[bool | None, str]:
    """A's verdict against B at each one's best LR is one of `allowed` (default: equal)."""
    c = compare_at_best_lr(results, a, b)
    if c is None:
        return missing()
    return (c.verdict in allowed,
            f"best LR {_label(a)}: {results.best_lr(**a):g}, {_label(b)}: {results.best_lr(**b):g}; "
            f"A − B: {c}")


def mean_sensitivity(results: Results, **tags) -> float | None:
    if not results.full(**tags):
        return None
    return stats.mean(list(results.sensitivity_per_seed(**tags).values()))


def sensitivity_table(results: Results, arms: dict[str, dict]) -> dict[str, dict[int, float]] | None:
    """Per-seed LR sensitivity of each arm, or None while runs are missing."""
    if not all(results.full(**tags) for tags in arms.values()):
        return None
    return {name: results.sensitivity_per_seed(**tags) for name, tags in arms.items()}


def fmt_per_seed(values: dict[int, float]) -> str:
    return ", ".join(f"seed {s}: {v:.4f}" for s, v in sorted(values.items()))


def largest_stable_lr(results: Results, **tags) -> float | None:
    """The largest LR of the grid at which no seed diverged (None: missing runs; 0.0: every LR diverged)."""
    if not results.full(**tags):
        return None
    ok = [lr for lr in results.tag_values("lr", **tags) if not any(results.values("diverged", lr=lr, **tags))]
    return max(ok) if ok else 0.0
