"""Claim 15: dropout is unnecessary in single-epoch pre-training.

The lecture: dropout regularises against overfitting, and a model that sees every token once has nothing
to overfit; Llama, Mistral, Qwen and Gemma 2 pre-train without it.

Test (protocol v2, claims.md): S with embed/resid/attn dropout 0.1 vs none, single epoch, at the baseline's
best LR; 4 seeds each, 600 steps, paired by seed.

Criteria (claims.md, verbatim; fixed before any run):
  (a) no dropout not worse than dropout by more than 1%;
  (b) the train-val gap with dropout not smaller than without by more than 0.02 nats (non-inferior rule
      on gap_none - gap_dropout with m = 0.02).
How each is judged (the protocol's rules, paired by seed):
  (a) the *not worse* rule on L_none − L_dropout (final validation losses, a diverged run counted as ln V),
      m = 1% of mean(L_dropout);
  (b) the *not worse* rule on gap_none(s) − gap_dropout(s), m = 0.02 nats, with gap = the mean logged
      training loss over the last 10% of the steps minus the final validation loss (claim 9's definition).

Choices claims.md leaves open, made here before any run and kept:
  - LR: "the baseline's best LR" is model S's best LR over {1e-3, 3e-3, 1e-2} from the 12 shared runs of
    claims 3 and 4 (`protocol.baseline_specs`, part of this grid). The arm without dropout IS model S at
    that LR: its 4 runs are the baseline's runs at that LR (the same config, so the same records), tagged
    arm "baseline". The dropout arm runs once the LR is known; until then (a) and (b) are not judged (runs
    missing). The report says which LR.
  - The claim's baseline arm (the one that must end below the count bigram) is S, arm "baseline".
  - Dropout: embed_dropout = resid_dropout = attn_dropout = 0.1; everything else is S's.
  - Single epoch: the stdlib corpus with bpe:2048 has 10,293,216 training tokens (measured with
    `lecture3.data.corpus_stats`), while a run reads 600 steps x 16 rows of 129 tokens (128 inputs + the
    shifted target) = 1,238,400 tokens, 12% of it: no training row is seen twice.
  - The gap's training loss: the protocol logs every 10 steps the mean training loss since the last log,
    so the last 10% of the steps (541..600) are the logged records with step > 540; their mean is the mean
    over those 60 steps. (The records' `train_loss_tail` covers the last 5%, so it is not used.)
  - The training loss with dropout is the loss of the training step itself, measured with dropout active
    (the masks of that step); the validation loss is always deterministic (no dropout). So the "gap" of
    the dropout arm includes the cost of the dropout noise on the training loss; the criterion is read as
    written.
  - A diverged run has no gap to take: (b) then fails (the gap cannot show what the claim says), as in
    claim 9.
"""

from __future__ import annotations

from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, Criterion, RunSpec

RATE = 0.1
DROPOUT = {"embed_dropout": RATE, "resid_dropout": RATE, "attn_dropout": RATE}
GAP_MARGIN = 0.02  # nats
GAP_FRACTION = 0.10  # the gap's training loss: the last 10% of the steps
TRAIN_TOKENS = 10_293_216  # stdlib, bpe:2048, training split (corpus_stats)
BASELINE = {"arm": "baseline"}  # S over the LR grid; at the best LR it is the arm without dropout


def runs(scale: str) -> list[RunSpec]:
    """S's 12 baseline runs (the arm without dropout among them) and the dropout arm at their best LR."""
    lr = protocol.baseline_best_lr(scale)
    arms = [] if lr is None else [
        RunSpec(protocol.config(protocol.model_s(**DROPOUT), lr=lr, seed=seed, scale=scale),
                {"arm": "dropout", "lr": lr, "seed": seed}) for seed in protocol.SEEDS]
    return protocol.baseline_specs(scale) + arms


def arms(results) -> dict[str, dict] | None:
    """The tags of the two arms at the baseline's best LR (None while the baseline's runs miss)."""
    lr = results.best_lr(**BASELINE)
    return None if lr is None else {"none": {**BASELINE, "lr": lr}, "dropout": {"arm": "dropout", "lr": lr}}


def gap(result: dict) -> float | None:
    """Mean logged training loss over the last 10% of the steps minus the final validation loss (None:
    diverged, no gap)."""
    start = result["steps"] * (1 - GAP_FRACTION)
    tail = [r["loss"] for r in result.get("history", []) if r["step"] > start and r.get("loss") is not None]
    if result["diverged"] or not tail or result.get("final_val_loss") is None:
        return None
    return stats.mean(tail) - result["final_val_loss"]


def gaps(results, tags: dict) -> dict[int, float | None]:
    """seed -> train-val gap of the runs matching `tags`."""
    return dict(sorted((s.tags["seed"], gap(r["result"])) for s, r in results.select(**tags)))


def crit_a(results):
    a = arms(results)
    if a is None:
        return judge.missing("the baseline's LR grid")
    return judge.compare(results, a["none"], a["dropout"], "not_worse", label="L_none − L_dropout")


def crit_b(results):
    a = arms(results)
    if a is None or not all(results.full(**t) for t in a.values()):
        return judge.missing()
    g = {name: gaps(results, t) for name, t in a.items()}
    bad = [name for name, v in g.items() if None in v.values()]
    if bad:
        return judge.check(False, f"a run of {', '.join(bad)} diverged: no train-val gap")
    diffs = {seed: g["none"][seed] - g["dropout"][seed] for seed in g["none"]}
    return judge.compare_diffs(diffs, "not_worse", margin=GAP_MARGIN, label="gap_none − gap_dropout")


def criteria(results) -> list[Criterion]:
    return [judge.criterion("(a)", "no dropout not worse than dropout by more than 1%", crit_a(results)),
            judge.criterion("(b)", "the train-val gap with dropout not smaller than without by more than 0.02 nats "
                            "(non-inferior rule on gap_none - gap_dropout with m = 0.02)", crit_b(results))]


def plots(results, folder):
    a = arms(results)
    if a is None:
        return []
    lr = a["none"]["lr"]
    figs = [report.curves(results, folder, "loss_curves.png", lr=lr,
                          title=f"training loss at LR {lr:g} (dropout arm: with dropout active), mean of the seeds")]
    labels = [n for n, t in a.items() if results.select(**t)]
    figs.append(report.bars(labels, [results.values(**a[n]) for n in labels], folder, "final_loss.png",
                            "final val loss (nats)", f"final val loss, LR {lr:g}"))
    return figs


def observations(results) -> list[str]:
    a = arms(results)
    if a is None:
        return ["the baseline's best LR is not known yet: the dropout arm has not run"]
    out = [f"LR of both arms: {a['none']['lr']:g} (the baseline's best LR; the arm without dropout is S's runs "
           "at that LR)"]
    for name, tags in a.items():
        g = gaps(results, tags)
        if g and None not in g.values():
            out.append(f"{name}: train-val gap per seed " + ", ".join(f"{x:+.4f}" for x in g.values()))
    tokens = sorted({r["result"]["tokens"] for _, r in results.rows})
    if tokens:
        out.append(f"tokens read per run: {', '.join(f'{t:,}' for t in tokens)} (inputs) of {TRAIN_TOKENS:,} "
                   "training tokens in the corpus: a single epoch")
    return out


def key_number(results) -> str:
    a = arms(results)
    if a is None or not all(results.full(**t) for t in a.values()):
        return ""
    d = stats.mean(results.values(**a["dropout"])) - stats.mean(results.values(**a["none"]))
    return f"Δ(dropout − none) = {d:+.3f} nats"


CLAIM = Claim(
    number=15, name="c15_dropout", title="dropout is unnecessary in single-epoch pre-training",
    lecture="Dropout guards against overfitting; a model that sees every token once has nothing to overfit, and "
            "the open models since Llama pre-train without it.",
    references="The lecture; Llama, Mistral, Qwen and Gemma 2 train without dropout.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number, observations=observations,
    baseline=BASELINE,
    setup="Model S, 600 steps, 4 seeds, at the baseline's best LR (S's best over {1e-3, 3e-3, 1e-2}, from the 12 "
          "shared runs in this grid; the arm without dropout is S's runs at that LR): embed/resid/attn dropout "
          "0.1 vs none; one epoch (1,238,400 of 10,293,216 training tokens per run); the train-val gap takes "
          "the logged training loss of the last 10% of the steps, measured with dropout active in the dropout "
          "arm.",
)
