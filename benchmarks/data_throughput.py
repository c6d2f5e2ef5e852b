"""How many tokens per second the training loader delivers, against what a training run consumes.

The default training run takes about 16 x 256 tokens per step at about 5 steps/s, i.e. ~20k tokens/s;
the loader should deliver at least 20 times that, so that it never stalls a step.

    python benchmarks/data_throughput.py                            # stdlib, bytes, batch 16 x 256
    python benchmarks/data_throughput.py --data.tokenizer bpe:4096  # any --data.* flag of lecture3
"""

from __future__ import annotations

import argparse
import sys
import time

from lecture3.data import DataConfig, corpus_stats, make_train_iterator
from lecture3.flags import add_dataclass_flags, dataclass_from_args


def main(argv: list[str] | None = None) -> float:
    """Times the loader and prints its tokens/s and the ratio to the consumption rate; returns the ratio."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    add_dataclass_flags(parser, "data", DataConfig)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size (default: 16)")
    parser.add_argument("--batches", type=int, default=500, help="batches to time (default: 500)")
    parser.add_argument("--warmup", type=int, default=20, help="batches read before timing (default: 20)")
    parser.add_argument("--consume-tokens-per-s", type=float, default=20_000,
                        help="tokens/s the training run consumes (default: 20000 = 16 x 256 x 5 steps/s)")
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(args, "data", DataConfig)

    # Build the corpus, tokenizer and token cache first, so that only reading is timed.
    corpus_stats(cfg, progress=True)
    start = time.perf_counter()
    it = make_train_iterator(cfg, args.batch_size)
    for _ in range(args.warmup):
        next(it)
    first = time.perf_counter() - start

    tokens = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
        tokens += int(batch["loss_mask"].sum())
    elapsed = time.perf_counter() - start

    state_start = time.perf_counter()
    restored = make_train_iterator(cfg, args.batch_size)
    restored.set_state(it.get_state())
    next(restored)
    resume = time.perf_counter() - state_start

    rate = tokens / elapsed
    ratio = rate / args.consume_tokens_per_s
    print(f"source {cfg.source}, tokenizer {cfg.tokenizer}, batch {args.batch_size} x {cfg.seq_len}, "
          f"workers {cfg.num_workers}")
    print(f"open + {args.warmup} warm-up batches: {first:.2f} s; resume from a saved state: {resume:.2f} s")
    print(f"{args.batches} batches, {tokens:,} tokens in {elapsed:.2f} s: {rate:,.0f} tokens/s")
    print(f"ratio to a run consuming {args.consume_tokens_per_s:,.0f} tokens/s: {ratio:.1f}x "
          f"({'meets' if ratio >= 20 else 'MISSES'} the 20x target)")
    return ratio


if __name__ == "__main__":
    sys.exit(0 if main() >= 20 else 1)
