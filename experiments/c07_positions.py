"""Claim 7: RoPE is the consensus; relative position is what matters.

The lecture: rotary position embeddings (RoPE, Su et al. 2021) are what nearly every model since 2023
uses; what matters is that attention sees relative positions. EleutherAI's 1.3B comparison: LAMBADA
perplexity 7.94 with learned absolute positions vs 7.16 with rotary.

Test: model S trained at context T = 256 with each position scheme: rope (theta 10k, the baseline),
sinusoidal (absolute, added to the embeddings), learned (an absolute table), alibi (Press et al. 2021),
relative (T5 bucketed biases, Raffel et al. 2020) and none (NoPE: the causal mask alone), 3 seeds each.

Criteria (fixed before any run; per-seed final validation losses, a diverged run counted as ln V):
  (a) RoPE is not worse than any other scheme: for every other scheme X, the protocol's comparison of
      rope against X is not "worse" (Δ = mean(rope) − mean(X) ≤ max(2·SE, 0.01));
  (b) RoPE is better than learned and better than sinusoidal: the comparison of rope against each is
      "better" (Δ < −max(2·SE, 0.01)), both.
Also reported, without a criterion: the loss of the trained params evaluated at T = 512 (twice the
training context) for the schemes that allow it.

Choices the protocol left open, made here before any run and kept:
  - LR: claim 7 gives no LR grid, so every run uses the protocol's baseline LR 3e-3 (one LR, 3 seeds).
  - Batch: 8 rows of 256 tokens, so a step sees 2,048 tokens as the protocol's 16 x 128 does; 300 steps
    = 614,400 tokens per run, the same as every T = 128 claim. The validation set is 32 batches of 8 rows
    of 256 = 65,536 tokens (the protocol's 64k). (`protocol.config` fixes batch 16, so the module sets
    train.batch_size after it.)
  - max_seq_len stays S's 512, so every scheme can be evaluated at T = 512 from the same params.
  - The T = 512 observation leaves out `learned`: its table has 512 rows but only rows 0..255 were ever
    trained (rows 256..511 keep their init, shrunk by weight decay), so its number would measure an
    untrained table, not extrapolation. Sinusoidal, alibi, relative, rope and none are evaluated at 512
    (16 batches of 8 rows of 512 = 65,536 tokens of the same validation split).
  - T5 relative positions keep lecture3's defaults: 32 buckets, max distance 128 (distances 128..255 share
    the last bucket); ALiBi uses the standard geometric slopes of 4 heads.
"""

from __future__ import annotations

from lecture3.experiment import judge, protocol, report, stats
from lecture3.experiment.spec import Claim, Criterion, RunSpec

LR = 3e-3
SEQ_LEN = 256
BATCH = 8  # 8 x 256 = 2,048 tokens per step, as the protocol's 16 x 128
EVAL_SEQ_LEN = 512
SCHEMES = ("rope", "sinusoidal", "learned", "alibi", "relative", "none")
ABSOLUTE = ("learned", "sinusoidal")
NO_LONG_EVAL = ("learned",)  # rows past the trained 256 of its table are untrained


def run_config(position: str, seed: int, scale: str = "cpu"):
    cfg = protocol.config(protocol.model_s(position=position), lr=LR, seed=seed, seq_len=SEQ_LEN, scale=scale)
    return cfg.replace(**{"train.batch_size": BATCH})


def runs(scale: str) -> list[RunSpec]:
    return [RunSpec(run_config(p, seed, scale), {"arm": p, "lr": LR, "seed": seed},
                    args={} if p in NO_LONG_EVAL else {"eval_seq_lens": [EVAL_SEQ_LEN]})
            for p in SCHEMES for seed in protocol.SEEDS]


def _losses(results, arm):
    return results.values(arm=arm) if results.full(arm=arm) else None


def _diverged(results, arm) -> int:
    return sum(bool(r["result"].get("diverged")) for _, r in results.select(arm=arm))


def crit_a(results):
    others = [s for s in SCHEMES if s != "rope"]
    rope = _losses(results, "rope")
    if rope is None or any(_losses(results, s) is None for s in others):
        return judge.missing()
    cmp = {s: stats.compare(rope, _losses(results, s)) for s in others}
    return (all(c.verdict != "worse" for c in cmp.values()),
            "; ".join(f"rope − {s}: {c}" for s, c in cmp.items()))


def crit_b(results):
    rope = _losses(results, "rope")
    if rope is None or any(_losses(results, s) is None for s in ABSOLUTE):
        return judge.missing()
    cmp = {s: stats.compare(rope, _losses(results, s)) for s in ABSOLUTE}
    return (all(c.verdict == "better" for c in cmp.values()),
            "; ".join(f"rope − {s}: {c}" for s, c in cmp.items()))


def criteria(results) -> list[Criterion]:
    return [judge.criterion("(a)", "RoPE not worse than any other scheme (rope vs each: not 'worse')",
                            crit_a(results)),
            judge.criterion("(b)", "RoPE better than learned and better than sinusoidal", crit_b(results))]


def _long(results, arm) -> list[float]:
    out = []
    for _, rec in sorted(results.select(arm=arm), key=lambda sr: sr[0].tags["seed"]):
        v = rec["result"].get("evals", {}).get(f"seq_len_{EVAL_SEQ_LEN}")
        if v is not None:
            out.append(v)
    return out


def observations(results) -> list[str]:
    out = []
    for s in SCHEMES:
        if _diverged(results, s):
            out.append(f"{s}: {_diverged(results, s)} diverged run(s), counted as ln V")
    rows = []
    for s in SCHEMES:
        if s in NO_LONG_EVAL:
            continue
        at256 = [r["result"]["final_val_loss"] for _, r in results.select(arm=s)
                 if r["result"].get("final_val_loss") is not None]
        at512 = _long(results, s)
        if at512 and at256:
            rows.append(f"{s} {stats.fmt_mean_std(at512)} (at the training T: {stats.mean(at256):.4f}, "
                        f"{stats.mean(at512) - stats.mean(at256):+.4f})")
    if rows:
        out.append(f"loss at T = {EVAL_SEQ_LEN} (twice the training context, same params, mean ± std over seeds): "
                   + "; ".join(rows) + ". Learned positions are left out: their table rows past 256 were "
                   "never trained.")
    return out


def plots(results, folder):
    labels = [s for s in SCHEMES if results.select(arm=s)]
    figs = [report.bars(labels, [results.values(arm=s) for s in labels], folder, "loss_by_position.png",
                        "final val loss at T = 256 (nats)", "final val loss by position scheme (LR 3e-3)")]
    long = [s for s in labels if _long(results, s)]
    if long:
        figs.append(report.bars(long, [_long(results, s) for s in long], folder, "loss_at_512.png",
                                f"val loss at T = {EVAL_SEQ_LEN} (nats)",
                                f"observation: trained at 256, evaluated at {EVAL_SEQ_LEN}"))
    return figs


def key_number(results) -> str:
    rope = _losses(results, "rope")
    if rope is None:
        return ""
    parts = [f"rope {stats.mean(rope):.3f}"]
    for s in ABSOLUTE:
        other = _losses(results, s)
        if other is not None:
            parts.append(f"{s} {stats.mean(other) - stats.mean(rope):+.3f}")
    return ", ".join(parts) + " nats"


CLAIM = Claim(
    number=7, name="c07_positions", title="RoPE is the consensus; relative position is what matters",
    lecture="RoPE is what nearly every model since 2023 uses for positions; what attention needs is relative "
            "position, which RoPE, ALiBi and T5's biases give and absolute (learned, sinusoidal) tables do not.",
    references="EleutherAI (Biderman et al., rotary blog, 1.3B): LAMBADA perplexity learned 7.94 vs rotary 7.16.",
    runs=runs, criteria=criteria, plots=plots, key_number=key_number, observations=observations,
    setup="Model S at T = 256 (batch 8 x 256 = 2,048 tokens per step, as 16 x 128), LR 3e-3 for every scheme "
          "(no LR grid), 3 seeds; schemes rope, sinusoidal, learned, alibi, relative (T5: 32 buckets, max "
          "distance 128), none. The trained params are also evaluated at T = 512 (not learned: its table rows "
          "past 256 are untrained).",
)
