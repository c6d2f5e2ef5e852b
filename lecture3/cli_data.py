"""`lecture3 data`: build a corpus and its tokenizer and print their statistics."""

from __future__ import annotations

import argparse
import time

from lecture3.config import Config
from lecture3.data import DataConfig
from lecture3.flags import add_dataclass_flags, dataclass_from_args


def add_data_args(parser: argparse.ArgumentParser) -> None:
    aliases = {"source": ["--source"], "tokenizer": ["--tokenizer"]}
    add_dataclass_flags(parser, "data", DataConfig, aliases=aliases, defaults=Config().data)
    parser.add_argument("--max-documents", type=int, default=None,
                        help="count only the first N documents of each split of a large tfds dataset "
                        "(one not read through the token cache)")


def run_data(args: argparse.Namespace) -> int:
    from lecture3.data import corpus_stats  # loads the sources and grain: not for --help

    cfg = dataclass_from_args(args, "data", DataConfig, Config().data)  # the data `lecture3 train` reads
    start = time.perf_counter()
    stats = corpus_stats(cfg, max_documents=args.max_documents, progress=True)
    rows = [("source", stats["source"]), ("tokenizer", stats["tokenizer"]),
            ("vocab size", stats["vocab_size"])]
    for role in ("train", "validation"):
        s = stats[role]
        rows += [(f"{role} documents", f"{s['documents']:,}"), (f"{role} bytes", f"{s['bytes']:,}"),
                 (f"{role} tokens", f"{s['tokens']:,}"),
                 (f"{role} bytes/token", f"{s['bytes_per_token']:.3f}"),
                 (f"{role} invalid UTF-8", f"{s['invalid_utf8_replaced']:,} replaced")]
    rows.append(("validation sequences", f"{stats['validation_sequences']} of {cfg.seq_len + 1} tokens"))
    cov = stats["validation_coverage"]
    rows.append(("validation coverage", f"{100 * cov['token_share']:.1f}% of the split's tokens; "
                 f"{cov['documents_touched']} of {cov['documents']} documents, {cov['long_documents_touched']} of "
                 f"the {cov['long_documents']} longer than one row"))
    docs = stats["batch_documents"]
    rows.append(("documents per batch", "not tracked for a streamed source" if docs is None else
                 f"{docs:.1f} distinct in a batch of 16 rows (mean over 100 batches)"))
    rows.append(("time", f"{time.perf_counter() - start:.1f} s"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"sample ({stats['sample_tokens']} tokens, decoded):")
    print(stats["sample"])
    return 0


def command():
    return ("build a corpus and tokenizer and print their statistics", add_data_args, run_data)
