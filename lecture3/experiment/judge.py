"""Building blocks of the claims' criteria (protocol v2). Each returns an outcome tuple
`(outcome, detail, comparisons)`: outcome "pass" / "fail" / "inconclusive", or None while the runs it
needs are not all recorded, so a criterion is judged only on complete evidence; `criterion()` turns one
into a `Criterion`.

    compare(results, a, b, "better")                     A vs B paired by seed (final loss)
    compare(results, a, b, "equivalent", best_lr=True)   each arm at its own best LR
    compare_values(a_by_seed, b_by_seed, "not_worse")    any per-seed quantity
    compare_diffs(d_by_seed, "better")                   a per-seed difference against 0
    check(ok, detail)                                    a deterministic criterion: pass or fail
    all_of([...]) / any_of([...])                        each of several / some of several must pass
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lecture3.experiment import stats
from lecture3.experiment.spec import Criterion, Results

Outcome = tuple  # (str | None, str, tuple[(label, stats.Paired), ...])


def criterion(name: str, text: str, outcome: Outcome) -> Criterion:
    result, detail, *rest = outcome
    return Criterion(name, text, result, detail, tuple(rest[0]) if rest else ())


def missing(what: str = "") -> Outcome:
    return None, f"runs missing{': ' + what if what else ''}", ()


def check(ok: bool, detail: str) -> Outcome:
    """A deterministic criterion (a count, a ratio, "in every seed"): pass or fail, never inconclusive."""
    return ("pass" if ok else "fail"), detail, ()


def _label(tags: Mapping) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in tags.items())


def compare_values(a: Mapping, b: Mapping, kind: str, *, margin: float | None = None,
                   margin_fraction: float = stats.MARGIN_FRACTION, unit: str = "nats",
                   label: str = "A − B") -> Outcome:
    """A vs B paired by seed (seed -> value), with the rule of `kind`; missing while either is empty."""
    if not a or not b:
        return missing()
    p = stats.paired(a, b, kind, margin=margin, margin_fraction=margin_fraction, unit=unit, label=label)
    return p.outcome, str(p), ((label, p),)


def compare_diffs(diffs: Mapping, kind: str, *, margin: float = 0.0, reference: float = math.nan,
                  unit: str = "nats", label: str = "d") -> Outcome:
    """A per-seed quantity against 0 with the rule of `kind` (e.g. a difference of gaps)."""
    if not diffs:
        return missing()
    p = stats.of_diffs(diffs, kind, margin=margin, reference=reference, unit=unit, label=label)
    return p.outcome, str(p), ((label, p),)


def compare(results: Results, a: dict, b: dict, kind: str, *, key: str = "final_loss", best_lr: bool = False,
            margin: float | None = None, margin_fraction: float = stats.MARGIN_FRACTION, unit: str = "nats",
            label: str | None = None) -> Outcome:
    """Arm `a` against arm `b` (tags), paired by seed; with `best_lr` each at its own best LR of the grid."""
    if not (results.full(**a) and results.full(**b)):
        return missing(f"{_label(a)} or {_label(b)}")
    prefix = ""
    if best_lr:
        la, lb = results.best_lr(**a), results.best_lr(**b)
        if la is None or lb is None:
            return missing()
        prefix = f"best LR {_label(a)}: {la:g}, {_label(b)}: {lb:g}; "
        a, b = {**a, "lr": la}, {**b, "lr": lb}
    label = label or f"[{_label(a)}] − [{_label(b)}]"
    out, detail, comps = compare_values(results.by_seed(key, **a), results.by_seed(key, **b), kind, margin=margin,
                                        margin_fraction=margin_fraction, unit=unit, label=label)
    return out, prefix + detail, comps


def _combined(parts: Sequence[Outcome], passes) -> Outcome:
    """Several statements as one: `passes(outcomes)` says when it passes; it fails when every part fails
    (any_of) or any part fails (all_of), and is inconclusive otherwise; missing while any part is."""
    outs = [p[0] for p in parts]
    detail = "; ".join(p[1] for p in parts)
    comps = tuple(c for p in parts for c in (p[2] if len(p) > 2 else ()))
    if any(o is None for o in outs):
        return None, detail, comps
    fails = "fail" in outs if passes is all else all(o == "fail" for o in outs)
    result = "pass" if passes(o == "pass" for o in outs) else "fail" if fails else "inconclusive"
    return result, detail, comps


def all_of(parts: Sequence[Outcome]) -> Outcome:
    """Several statements that must each pass: fail if any fails, pass if all pass, else inconclusive."""
    return _combined(parts, all)


def any_of(parts: Sequence[Outcome]) -> Outcome:
    """Some of several statements passes: pass if any passes, fail if all fail, else inconclusive."""
    return _combined(parts, any)


def max_attn_logit(result: dict) -> float | None:
    """A run's largest pre-cap attention logit: the end-of-training probe's, or for a diverged run (no
    probe) the last finite one logged in training; None when there is none."""
    probe = result.get("probe")
    if probe is not None:
        return probe["max_attn_logit"]
    logged = [r["max_attn_logit"] for r in result.get("history", []) if r.get("max_attn_logit") is not None]
    return logged[-1] if logged else None


def baseline_lr(results: Results) -> float | None:
    """The best LR of model S's shared baseline grid (`protocol.baseline_specs`, arm "baseline") among these
    results: the LR the claims that run "at the baseline's best LR" use; None until it is all recorded."""
    return results.best_lr(arm="baseline")


def mean_sensitivity(results: Results, **tags) -> float | None:
    if not results.full(**tags):
        return None
    return stats.mean(list(results.sensitivity_per_seed(**tags).values()))


def sensitivity_table(results: Results, arms: dict[str, dict]) -> dict[str, dict[int, float]] | None:
    """Per-seed LR sensitivity of each arm, or None while runs are missing."""
    if not all(results.full(**tags) for tags in arms.values()):
        return None
    return {name: results.sensitivity_per_seed(**tags) for name, tags in arms.items()}


def compare_sensitivity(results: Results, a: dict, b: dict, kind: str, *, margin: float = 0.0,
                        label: str = "sensitivity A − B") -> Outcome:
    """LR sensitivity (nats, per seed over the arm's LR grid) of arm `a` against arm `b`, paired by seed."""
    table = sensitivity_table(results, {"a": a, "b": b})
    if table is None:
        return missing()
    return compare_values(table["a"], table["b"], kind, margin=margin, label=label)


def fmt_per_seed(values: dict[int, float]) -> str:
    return ", ".join(f"seed {s}: {v:.4f}" for s, v in sorted(values.items()))


def largest_stable_lr(results: Results, **tags) -> float | None:
    """The largest LR of the grid at which no seed diverged (None: missing runs; 0.0: every LR diverged)."""
    if not results.full(**tags):
        return None
    ok = [lr for lr in results.tag_values("lr", **tags) if not any(results.values("diverged", lr=lr, **tags))]
    return max(ok) if ok else 0.0
