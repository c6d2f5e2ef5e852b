"""Claim 9: weight decay is not regularisation here; it helps through the LR schedule, as the LR goes to 0.

The lecture: in single-epoch pre-training weight decay does not close a train–validation gap (there is
none to close); it changes the optimisation, and its benefit appears at the end of a cosine schedule.

Test: model S with weight decay {0, 0.1, 0.3}, cosine to a final LR of 0, one epoch (no token seen
twice), 3 seeds; the validation loss at 50% and at 100% of training.

Criteria (fixed before any run):
  (a) the train–val gap (mean training loss of the last 5% of the steps minus the final validation
      loss) differs across the weight decays by less than 0.02 (max − min of the per-WD mean gaps);
  (b) some WD > 0 ends better than WD 0 (the protocol's rule);
  (c) that WD's advantage over WD 0 at 50% of training is smaller than at the end by at least 0.01.

Choices made here: peak LR 3e-3; every step is logged (log_every 1) so the last 5% are all counted; the
50% point is the validation loss at step 150 of 300; if several WDs end better than WD 0, (c) uses the one
with the lowest final loss. The decay is AdamW's decoupled one (lecture3's default).
"""

from __future__ import annotations

from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, RunSpec

LR = 3e-3
WDS = (0.0, 0.1, 0.3)


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(protocol.model_s(), lr=LR, seed=seed, scale=scale, weight_decay=wd,
                                    final_lr=0.0, log_every=1, eval_every=protocol.STEPS // 2),
                    {"arm": f"wd={wd:g}", "wd": wd, "seed": seed})
            for wd in WDS for seed in protocol.SEEDS]


def _mid(rec) -> float | None:
    h = [r for r in rec["result"]["history"] if r.get("val_loss") is not None]
    return h[0]["val_loss"] if len(h) >= 2 else None


def _values_mid(results, wd):
    rows = sorted(results.select(wd=wd), key=lambda sr: sr[0].tags["seed"])
    return [_mid(r) for _, r in rows]


def _full(results):
    return all(results.full(wd=wd) for wd in WDS)


def crit_a(results):
    if not _full(results):
        return judge.missing()
    gaps = {}
    for wd in WDS:
        rows = [r["result"] for _, r in results.select(wd=wd)]
        if any(r["diverged"] or r["train_loss_tail"] is None for r in rows):
            return False, f"a run at WD {wd:g} diverged: no gap"
        gaps[wd] = stats.mean([r["train_loss_tail"] - r["final_val_loss"] for r in rows])
    spread = max(gaps.values()) - min(gaps.values())
    return spread < 0.02, (f"mean train − val gap: {', '.join(f'WD {k:g}: {v:+.4f}' for k, v in gaps.items())}; "
                           f"spread {spread:.4f}")


def _best_wd(results):
    better = []
    for wd in WDS[1:]:
        c = stats.compare(results.values(wd=wd), results.values(wd=0.0))
        if c.verdict == "better":
            better.append((stats.mean(results.values(wd=wd)), wd, c))
    return min(better) if better else None


def crit_b(results):
    if not _full(results):
        return judge.missing()
    detail = "; ".join(f"WD {wd:g} − WD 0: {stats.compare(results.values(wd=wd), results.values(wd=0.0))}"
                       for wd in WDS[1:])
    return _best_wd(results) is not None, detail


def crit_c(results):
    if not _full(results):
        return judge.missing()
    best = _best_wd(results)
    if best is None:
        return False, "no WD > 0 ends better than WD 0"
    wd = best[1]
    mid0, midw = _values_mid(results, 0.0), _values_mid(results, wd)
    if None in mid0 or None in midw:
        return False, "a run has no 50% validation loss (diverged?)"
    adv_mid = stats.mean(mid0) - stats.mean(midw)
    adv_end = stats.mean(results.values(wd=0.0)) - stats.mean(results.values(wd=wd))
    return adv_end - adv_mid >= 0.01, (f"WD {wd:g}'s advantage over WD 0: at 50% {adv_mid:+.4f}, at the end "
                                       f"{adv_end:+.4f} (grew by {adv_end - adv_mid:+.4f})")


def criteria(results):
    return [judge.criterion("(a)", "train–val gap differs across WD by < 0.02", crit_a(results)),
            judge.criterion("(b)", "some WD > 0 ends better than WD 0", crit_b(results)),
            judge.criterion("(c)", "that WD's advantage at 50% is smaller than at the end by >= 0.01", crit_c(results))]


def plots(results, folder):
    return [report.curves(results, folder, "loss_curves.png", title="training loss, cosine to 0 (mean of 3 seeds)"),
            report.curves(results, folder, "lr.png", key="lr", title="learning rate")]


def observations(results):
    out = []
    for wd in WDS:
        mids = [m for m in _values_mid(results, wd) if m is not None]
        if mids and results.full(wd=wd):
            out.append(f"WD {wd:g}: val loss at 50% {stats.fmt_mean_std(mids)}, at the end "
                       f"{stats.fmt_mean_std(results.values(wd=wd))}")
    return out


def key_number(results) -> str:
    if not _full(results):
        return ""
    best = min(WDS, key=lambda wd: stats.mean(results.values(wd=wd)))
    return f"best WD {best:g}: {stats.mean(results.values(wd=best)) - stats.mean(results.values(wd=0.0)):+.3f} vs WD 0"


CLAIM = Claim(
    number=9, name="c09_weight_decay", title="weight decay helps through the LR schedule, not as regularisation",
    lecture="In single-epoch pre-training there is no overfitting for weight decay to prevent: train and "
            "validation losses match whatever the decay. Weight decay still helps, through its interaction "
            "with the schedule: its benefit appears as the learning rate goes to zero.",
    references="Andriushchenko et al. 2023: train and val losses equal whatever the WD; under cosine, WD 0.3 is "
               "higher mid-run and lowest at the end.",
    runs=runs, criteria=criteria, plots=plots, observations=observations, key_number=key_number,
    setup="Model S, LR 3e-3 cosine to 0, WD {0, 0.1, 0.3} x 3 seeds, every step logged, validation at 50% and 100%.",
)
