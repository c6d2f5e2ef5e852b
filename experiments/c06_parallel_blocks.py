"""Claim 6: parallel blocks train about 15% faster with a small quality cost.

The lecture: computing attention and the MLP from the same normalised input and adding both to the
residual (GPT-J, PaLM) lets the two matmul groups fuse; PaLM reports ~15% faster training at scale.

Test: model S serial vs parallel (one shared input norm), at the baseline's LR, 3 seeds; the step time
of each in ONE process (median of 7 interleaved rounds of 10 steps).

Criteria (fixed before any run):
  (a) parallel is equal to serial, or worse by at most 2% relative (Δ / mean(serial));
  (b) parallel's step time is below serial's.

Choices made here: the LR is 3e-3 (lecture3's default, the middle of the protocol's grid); a parallel
block that is *better* than serial also passes (a).
"""

from __future__ import annotations

from lecture3.experiment import judge, measures, protocol, report, stats
from lecture3.experiment.spec import Claim, RunSpec

LR = 3e-3
ARMS = {"serial": {"block": "serial"}, "parallel": {"block": "parallel", "parallel_norm": "shared"}}


def runs(scale: str) -> list[RunSpec]:
    out = [RunSpec(protocol.config(protocol.model_s(**ch), lr=LR, seed=seed, scale=scale), {"arm": arm, "seed": seed})
           for arm, ch in ARMS.items() for seed in protocol.SEEDS]
    out.append(RunSpec(protocol.config(protocol.model_s(), lr=LR, seed=0, scale=scale), {"arm": "timing"},
                       measure="block_timing", args={"rounds": 7, "steps_per_round": 10}, exclusive=True))
    return out


def block_timing(config, rounds: int = 7, steps_per_round: int = 10, quick: bool = False) -> dict:
    import dataclasses

    cfgs = {arm: config.replace(model=dataclasses.replace(config.model, **ch)) for arm, ch in ARMS.items()}
    return measures.step_times(cfgs, rounds=2 if quick else rounds, steps_per_round=2 if quick else steps_per_round)


def _timing(results):
    return results.measured("block_timing")


def crit_a(results):
    if not all(results.full(arm=a) for a in ARMS):
        return judge.missing()
    c = stats.compare(results.values(arm="parallel"), results.values(arm="serial"))
    return c.verdict in ("equal", "better") or c.relative <= 0.02, f"parallel − serial: {c}"


def crit_b(results):
    t = _timing(results)
    if t is None:
        return judge.missing()
    m = t["median_s"]
    return m["parallel"] < m["serial"], (f"median step: parallel {1e3 * m['parallel']:.2f} ms, serial "
                                         f"{1e3 * m['serial']:.2f} ms (speed-up {m['serial'] / m['parallel']:.3f}x)")


def criteria(results):
    return [judge.criterion("(a)", "parallel equal to serial or worse by <= 2% relative", crit_a(results)),
            judge.criterion("(b)", "parallel step time < serial's", crit_b(results))]


def plots(results, folder):
    figs = [report.curves(results, folder, "loss_curves.png", title="training loss (mean of 3 seeds)")]
    t = _timing(results)
    if t is not None:
        figs.append(report.step_time_bars(t, folder))
    return figs


def key_number(results) -> str:
    t = _timing(results)
    return "" if t is None else f"parallel speed-up {t['median_s']['serial'] / t['median_s']['parallel']:.3f}x"


CLAIM = Claim(
    number=6, name="c06_parallel_blocks", title="parallel blocks train ~15% faster at a small quality cost",
    lecture="A parallel block computes attention and the MLP from the same normalised input and adds both to "
            "the residual (GPT-J, PaLM); the matmuls can fuse, for about 15% faster training at scale.",
    references="PaLM (Chowdhery et al. 2022): about 15% faster at scale; a small degradation at 8B, none at 62B.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number,
    setup="Model S serial vs parallel (shared norm) at LR 3e-3, 3 seeds; step times in one process, 7 "
          "interleaved rounds of 10 steps.",
)
