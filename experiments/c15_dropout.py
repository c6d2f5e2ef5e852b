"""Claim 15: dropout is unnecessary in single-epoch pre-training.

The lecture: dropout regularises against overfitting, and a model that sees every token once has nothing
to overfit; Llama, Mistral, Qwen and Gemma 2 pre-train without it.

Test: model S with dropout 0.1 on the embeddings, on each residual branch and on the attention
probabilities (embed_dropout = resid_dropout = attn_dropout = 0.1) vs none, single epoch, 3 seeds each.

Criteria (fixed before any run; per-seed final validation losses, a diverged run counted as ln V):
  (a) dropout is not better than none (the protocol's comparison of dropout against none is not "better");
  (b) the train–val gap with dropout is not smaller than without by more than 0.02: with gap = mean
      training loss of the last 5% of the steps minus the final validation loss (the protocol's, as
      claim 9), mean gap(none) − mean gap(dropout) ≤ 0.02.

Choices the protocol left open, made here before any run and kept:
  - LR: the claim gives no LR grid, so both arms use the protocol's baseline LR 3e-3.
  - Single epoch: the stdlib corpus with bpe:2048 has 10,293,216 training tokens in 1,718 documents
    (measured with `lecture3.data.corpus_stats`), while a run reads 300 steps x 16 rows of 129 tokens
    (128 inputs + the shifted target) = 619,200 tokens, 6% of it: no training token is seen twice.
  - Every step is logged (log_every 1), so the last 5% of the steps (15 of 300) all enter the gap.
  - The training loss with dropout is the loss of the training step itself, measured with dropout
    active (the masks of that step); the validation loss is always deterministic (no dropout). So the
    "gap" of the dropout arm includes the cost of the dropout noise on the training loss; the criterion is
    read as written.
  - A diverged run has no training loss tail to take a gap of: (b) then fails (the gap cannot show what
    the claim says), as in claim 9.
"""

from __future__ import annotations

from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, Criterion, RunSpec

LR = 3e-3
RATE = 0.1
ARMS = {"none": {}, "dropout": {"embed_dropout": RATE, "resid_dropout": RATE, "attn_dropout": RATE}}
GAP_MARGIN = 0.02
TRAIN_TOKENS = 10_293_216  # stdlib, bpe:2048, training split (corpus_stats)


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(protocol.config(protocol.model_s(**changes), lr=LR, seed=seed, scale=scale, log_every=1),
                    {"arm": arm, "lr": LR, "seed": seed})
            for arm, changes in ARMS.items() for seed in protocol.SEEDS]


def _full(results) -> bool:
    return all(results.full(arm=a) for a in ARMS)


def gaps(results, arm) -> list[float] | None:
    """Per-seed train–val gaps, None if a run diverged (no gap)."""
    rows = [r["result"] for _, r in sorted(results.select(arm=arm), key=lambda sr: sr[0].tags["seed"])]
    if any(r["diverged"] or r.get("train_loss_tail") is None or r.get("final_val_loss") is None for r in rows):
        return None
    return [r["train_loss_tail"] - r["final_val_loss"] for r in rows]


def crit_a(results):
    if not _full(results):
        return judge.missing()
    c = stats.compare(results.values(arm="dropout"), results.values(arm="none"))
    return c.verdict != "better", f"dropout − none: {c}"


def crit_b(results):
    if not _full(results):
        return judge.missing()
    g = {a: gaps(results, a) for a in ARMS}
    bad = [a for a, v in g.items() if v is None]
    if bad:
        return False, f"a run of {', '.join(bad)} diverged: no train–val gap"
    shrink = stats.mean(g["none"]) - stats.mean(g["dropout"])
    return shrink <= GAP_MARGIN, (
        f"mean train − val gap: none {stats.fmt_mean_std(g['none'])}, dropout {stats.fmt_mean_std(g['dropout'])} "
        f"(training loss with dropout active); gap(none) − gap(dropout) = {shrink:+.4f} (≤ 0.02: "
        f"{shrink <= GAP_MARGIN})")


def criteria(results) -> list[Criterion]:
    return [judge.criterion("(a)", "dropout not better than none", crit_a(results)),
            judge.criterion("(b)", "the train–val gap with dropout is not smaller by more than 0.02", crit_b(results))]


def plots(results, folder):
    figs = [report.curves(results, folder, "loss_curves.png",
                          title="training loss (dropout arm: with dropout active), mean of 3 seeds")]
    labels = [a for a in ARMS if results.select(arm=a)]
    figs.append(report.bars(labels, [results.values(arm=a) for a in labels], folder, "final_loss.png",
                            "final val loss (nats)", "final val loss, LR 3e-3"))
    return figs


def observations(results) -> list[str]:
    out = []
    for a in ARMS:
        g = gaps(results, a) if results.select(arm=a) else None
        if g:
            out.append(f"{a}: train–val gap per seed " + ", ".join(f"{x:+.4f}" for x in g))
    tokens = sorted({r["result"]["tokens"] for _, r in results.rows})
    if tokens:
        out.append(f"tokens read per run: {', '.join(f'{t:,}' for t in tokens)} (inputs) of {TRAIN_TOKENS:,} "
                   "training tokens in the corpus: a single epoch")
    return out


def key_number(results) -> str:
    if not _full(results):
        return ""
    d = stats.mean(results.values(arm="dropout")) - stats.mean(results.values(arm="none"))
    return f"Δ(dropout − none) = {d:+.3f} nats"


CLAIM = Claim(
    number=15, name="c15_dropout", title="dropout is unnecessary in single-epoch pre-training",
    lecture="Dropout guards against overfitting; a model that sees every token once has nothing to overfit, and "
            "the open models since Llama pre-train without it.",
    references="The lecture; Llama, Mistral, Qwen and Gemma 2 train without dropout.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number, observations=observations,
    setup="Model S, LR 3e-3, 3 seeds: embed/resid/attn dropout 0.1 vs none; one epoch (619,200 of 10,293,216 "
          "training tokens per run); every step logged; the dropout arm's training loss is measured with "
          "dropout active.",
)
