"""Claim 9: weight decay is not regularisation here; it helps through the LR schedule, when the LR goes to 0.

The lecture: in single-epoch pre-training weight decay does not close a train–validation gap (there is
none to close); it changes the optimisation, and its benefit appears at the end of a cosine schedule.

Test (protocol v2, `shared/claims.md`): model S with weight decay {0, 0.1, 0.3}, embeddings and head
decayed too, cosine to 0 (final LR 0), 1,200 steps (single epoch), 4 seeds; validation at 50% and 100%.

Criteria (claims.md, fixed before any run):
  (a) the train-val gap (mean logged training loss over the last 10% of steps minus final val) of each
      WD > 0 equivalent to WD 0's within 0.02 nats;
  (b) some WD > 0 better than WD 0 at the end;
  (c) for that WD (the one with the lower mean final loss if both pass (b)), its advantage over WD 0 is
      larger at the end than at 50% of training (the *better* rule on adv_50% - adv_end per seed, with
      adv = L_WD0 - L_WD).

Choices claims.md leaves open, made here and kept:
  - peak LR 3e-3 for every arm, fixed before any run (claims.md names none; a fixed LR keeps the grid
    from moving when S's LR grid is recorded). The baseline arm is WD 0 at that LR: the arm every
    comparison is made against.
  - the decay is AdamW's decoupled one (lecture3's default); "embeddings and head decayed too" is
    `TrainConfig.decay_embeddings` (the head is tied to the embedding).
  - the training loss is logged every 10 steps, each log the mean since the last one: the last 10% of
    the steps are the logs after step 1,080 (steps 1,081-1,200, all of them).
  - (a) is the equivalence rule on the per-seed gaps, paired by seed, for WD 0.1 and for WD 0.3 (each
    must pass). A run that diverged has no gap: (a) is then inconclusive.
  - (b) "some": pass if WD 0.1 or WD 0.3 passes the better rule, fail if both fail, else inconclusive.
  - (c) "that WD" is the WD > 0 that passes (b), the one with the lower mean final loss if both do; if
    none passes (b), the WD > 0 with the lower mean final loss, so that (c) is judged on its own and not
    a second count of (b). L at 50% is the validation loss at step 600, L at the end the final loss; a
    run that diverged counts as ln V at every point it did not reach.
"""

from __future__ import annotations

from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, RunSpec

LR = 3e-3
STEPS = 1200
WDS = (0.0, 0.1, 0.3)
TAIL_FRACTION = 0.1  # the train-val gap's training loss: the last 10% of the steps
GAP_MARGIN = 0.02  # nats


def arm(wd: float) -> dict:
    return {"arm": f"wd={wd:g}", "wd": wd, "lr": LR}


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(protocol.model_s(), lr=LR, seed=seed, steps=STEPS, scale=scale, weight_decay=wd,
                                    decay_embeddings=True, final_lr=0.0, eval_every=STEPS // 2),
                    {**arm(wd), "seed": seed})
            for wd in WDS for seed in protocol.SEEDS]


def _full(results) -> bool:
    return all(results.full(wd=wd) for wd in WDS)


def train_tail(result: dict) -> float | None:
    """Mean logged training loss over the last 10% of the steps (None: a run without those logs)."""
    start = result["steps"] * (1 - TAIL_FRACTION)
    tail = [r["loss"] for r in result["history"] if r["step"] > start and r.get("loss") is not None]
    return stats.mean(tail) if tail else None


def gap(result: dict) -> float | None:
    """Train-val gap of one run: mean training loss of the last 10% minus the final validation loss."""
    tail = train_tail(result)
    if result["diverged"] or tail is None:
        return None
    return tail - result["final_val_loss"]


def mid_loss(result: dict) -> float:
    """The validation loss at 50% of training (ln V for a run that diverged before it)."""
    half = result["steps"] // 2
    vals = [r["val_loss"] for r in result["history"] if r["step"] == half and r.get("val_loss") is not None]
    return vals[0] if vals else result["initial_loss"]


def per_seed(results, fn, wd: float) -> dict[int, float | None]:
    return {s.tags["seed"]: fn(r["result"]) for s, r in results.select(wd=wd)}


def crit_a(results):
    if not _full(results):
        return judge.missing()
    gaps = {wd: per_seed(results, gap, wd) for wd in WDS}
    bad = [f"WD {wd:g} seed {s}" for wd in WDS for s, g in gaps[wd].items() if g is None]
    if bad:
        return "inconclusive", f"no gap (the run diverged or logged no loss in the last 10%): {', '.join(bad)}", ()
    return judge.all_of([judge.compare_values(gaps[wd], gaps[0.0], "equivalent", margin=GAP_MARGIN,
                                              label=f"gap WD {wd:g} − gap WD 0") for wd in WDS[1:]])


def _better_at_end(results) -> dict:
    return {wd: judge.compare(results, {"wd": wd}, {"wd": 0.0}, "better") for wd in WDS[1:]}




def crit_b(results):
    if not _full(results):
        return judge.missing()
    return judge.any_of(list(_better_at_end(results).values()))


def chosen_wd(results) -> float:
    """(c)'s WD: the one passing (b) with the lower mean final loss, else the lower mean final loss of all."""
    passing = [wd for wd, out in _better_at_end(results).items() if out[0] == "pass"]
    return min(passing or WDS[1:], key=lambda wd: stats.mean(results.values(wd=wd)))


def crit_c(results):
    if not _full(results):
        return judge.missing()
    wd = chosen_wd(results)
    mid0, midw = per_seed(results, mid_loss, 0.0), per_seed(results, mid_loss, wd)
    end0, endw = results.by_seed(wd=0.0), results.by_seed(wd=wd)
    diffs = {s: (mid0[s] - midw[s]) - (end0[s] - endw[s]) for s in end0}
    out, detail, comps = judge.compare_diffs(diffs, "better", label=f"adv_50% − adv_end (WD {wd:g})")
    return out, f"WD {wd:g}: {detail}", comps


def criteria(results):
    return [
        judge.criterion("(a)", "the train-val gap (mean logged training loss over the last 10% of steps minus "
                        "final val) of each WD > 0 equivalent to WD 0's within 0.02 nats", crit_a(results)),
        judge.criterion("(b)", "some WD > 0 better than WD 0 at the end", crit_b(results)),
        judge.criterion("(c)", "for that WD, its advantage over WD 0 is larger at the end than at 50% of training "
                        "(better rule on adv_50% − adv_end per seed, adv = L_WD0 − L_WD)", crit_c(results)),
    ]


def plots(results, folder):
    return [report.curves(results, folder, "loss_curves.png", title="training loss, cosine to 0 (mean of 4 seeds)"),
            report.curves(results, folder, "lr.png", key="lr", title="learning rate")]


def observations(results):
    return [f"WD {wd:g}: val loss at 50% {stats.fmt_mean_std(list(per_seed(results, mid_loss, wd).values()))}, "
            f"at the end {stats.fmt_mean_std(results.values(wd=wd))}" for wd in WDS if results.full(wd=wd)]


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
    references="Andriushchenko et al. 2023 (nanoGPT, every matrix decayed, embeddings included): train and val "
               "losses equal whatever the WD; under cosine, WD 0.3 is higher mid-run and lowest at the end.",
    runs=runs, criteria=criteria, plots=plots, observations=observations, key_number=key_number,
    setup="Model S, LR 3e-3 (fixed) cosine to 0, 1,200 steps, WD {0, 0.1, 0.3} with embeddings and head decayed, "
          "4 seeds; validation at 50% and 100%.",
    baseline=arm(0.0),
)
