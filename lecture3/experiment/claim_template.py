"""A claim of your own, written by `lecture3 experiment new NAME`: edit it into your question.

As written it asks whether tying the input and output embeddings costs quality, on a tiny model, so that
it runs unedited:

    lecture3 experiment NAME --claims DIR --quick   # the code path in a minute: a smoke run, no verdict
    lecture3 experiment NAME --claims DIR           # the grid (16 runs, a few minutes on one core), then
                                                    # DIR/results/NAME/report.md, whose last line is the verdict

The parts, top to bottom: the arms (config changes against one base model), the grid (every arm x LR x
seed is one run, keyed by its config, so a rerun skips finished runs), the criteria (written before any
run, each a paired comparison of protocol v2 judged pass / fail / inconclusive), and one plot. Each run
leaves a JSON record in DIR/results/runs/ whose `command` reruns it from any folder.

Scale up to the lecture's model S and protocol (600 steps of 16 x 128 bpe:2048 tokens, minutes per run):
in `config` below use `protocol.model_s(**ARMS[arm])`, `steps=protocol.STEPS`, the default `seq_len`,
and drop `TINY`; and set `LRS = protocol.LRS`. Decide the criteria before you run the grid, and keep them.
"""

from __future__ import annotations

from pathlib import Path

from lecture3.experiment import judge, protocol, report
from lecture3.experiment.spec import Claim, RunSpec

# The arms: ModelConfig changes against the base model. Tags label runs in the report and the criteria.
ARMS = {"tied": {"tie_embeddings": True}, "untied": {"tie_embeddings": False}}
TIED, UNTIED = {"arm": "tied"}, {"arm": "untied"}
LRS = (3e-3, 1e-2)  # peak learning rates of the grid; "at each's best LR" picks each arm's best of them
SEEDS = protocol.SEEDS  # 4 seeds: every comparison is paired by seed (a seed sets init and data order)
STEPS = 200  # 200 steps x 16 rows x 64 byte tokens per run
# the tiny setup: byte tokens (vocabulary 259), rows of 64, 256 validation rows
TINY = {"data.tokenizer": "bytes", "data.val_sequences": 256, "train.eval_batches": 16}


def config(arm: str, lr: float, seed: int, scale: str):
    """One run: the arm's changes on a 2-layer, d_model-64 version of model S, trained with the protocol's
    recipe (AdamW, warmup then cosine, batch 16) at peak `lr` with `seed`."""
    model = protocol.model_s(d_model=64, n_layers=2, vocab_size=259, **ARMS[arm])
    return protocol.config(model, lr=lr, seed=seed, steps=STEPS, seq_len=64, scale=scale).replace(**TINY)


def runs(scale: str) -> list[RunSpec]:
    """The grid: every arm at every LR and seed (scale "gpu" widens the model; --quick shrinks each run)."""
    return [RunSpec(config(arm, lr, seed, scale), {"arm": arm, "lr": lr, "seed": seed})
            for arm in ARMS for lr in LRS for seed in SEEDS]


def criteria(results) -> list:
    """Fixed before any run. Each compares arm A with arm B on the final validation loss, paired by seed,
    with a 95% CI of the mean difference d = A - B (lower is better):
      "better"      A better than B: pass if the whole CI is below 0, fail if it is at or above 0
      "equivalent"  within a margin m (default 1% of B's mean): pass if the CI lies inside (-m, m)
      "not_worse"   A not worse than B by more than m: pass if the CI is below m
    anything else is inconclusive. `best_lr=True` takes each arm at its own best LR of the grid."""
    at = {"lr": 3e-3}
    return [
        judge.criterion("(a)", "tied not worse than untied by more than 1% at each's best LR",
                        judge.compare(results, TIED, UNTIED, "not_worse", best_lr=True)),
        judge.criterion("(b)", "tied equivalent to untied within 2% at LR 3e-3",
                        judge.compare(results, {**TIED, **at}, {**UNTIED, **at}, "equivalent", margin_fraction=0.02)),
        judge.criterion("(c)", "untied better than tied at each's best LR",
                        judge.compare(results, UNTIED, TIED, "better", best_lr=True)),
    ]


def plots(results, folder) -> list:
    """The report's figures: (file name, caption) pairs, drawn with lecture3.experiment.report's helpers."""
    return [report.loss_vs_lr(results, folder, "loss_vs_lr.png", title="final val loss vs peak LR, per arm")]


CLAIM = Claim(
    name=Path(__file__).stem,  # the file's name: `lecture3 experiment NAME` finds the claim by it
    title="tying the input and output embeddings costs no quality (a template: edit it into your claim)",
    lecture="What you claim, in a sentence or two, and who claims it. Here: tying the output projection to "
            "the input embedding (one matrix for both) saves its parameters at no cost in loss.",
    references="What the literature measured, with numbers. Here: Press & Wolf 2017 and Inan et al. 2017 tie "
               "them in LSTM language models, with lower perplexity and fewer parameters.",
    runs=runs, criteria=criteria, plots=plots,
    baseline=TIED,  # at its best LR it must end below a count bigram, or the verdict is "inconclusive (under-trained)"
    setup=f"A 2-layer, d_model-64 model S on byte tokens, T 64, {STEPS} steps; LR {', '.join(map(str, LRS))} x "
          f"{len(SEEDS)} seeds per arm.",
)
