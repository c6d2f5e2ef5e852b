"""Decode speed and KV-cache bytes of MHA, GQA and MQA (and a sliding window) at contexts 128..4096.

The lecture's case for MQA / GQA and for sliding windows is memory traffic during decoding: every new
token reads the whole cache. This measures, for one small model in each head layout, the decode
tokens/s of `lecture3.decoding.decode` (one compiled loop over the cached step) at a given context, and
the bytes of K and V actually held, next to `accounting.kv_cache_bytes`.

    python benchmarks/decode_kv_cache.py            # contexts 128..4096, table + PNG
    python benchmarks/decode_kv_cache.py --quick    # a small model and three contexts: a smoke run

The cache is filled synthetically up to the context (the cost of a step depends on how many keys it
reads, not on their values), then `--steps` tokens are decoded and timed (compilation excluded).
Ratios are from one run on whatever machine this is; they are never asserted in tests.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lecture3 import accounting
from lecture3.config import ModelConfig
from lecture3.decoding import decode
from lecture3.layers.kv_cache import cache_bytes, init_cache
from lecture3.model import Transformer


def layouts(quick: bool) -> dict[str, ModelConfig]:
    base = ModelConfig(vocab_size=512, d_model=128 if quick else 256, n_layers=2 if quick else 4, n_heads=8,
                       max_seq_len=8192)
    window = 64 if quick else 512
    return {
        "MHA": base,
        "GQA (K=2)": base.replace(n_kv_heads=2),
        "MQA (K=1)": base.replace(n_kv_heads=1),
        f"GQA + window {window}": base.replace(n_kv_heads=2, sliding_window=window,
                                               layer_pattern=("local", "global")),
    }


def filled_cache(cfg: ModelConfig, batch: int, context: int, filled: int, rng: np.random.Generator):
    """A cache of `context` tokens holding the first `filled` (random K/V; ring slots i % S)."""

    def fill(layer):
        s = layer["idx"].shape[-1]
        idx = np.arange(max(0, filled - s), filled)
        slots = idx % s
        new = {}
        for name in ("k", "v"):
            a = np.zeros(layer[name].shape, np.float32)
            a[..., slots, :, :] = rng.standard_normal(a[..., slots, :, :].shape)
            new[name] = jnp.asarray(a, layer[name].dtype)
        for name in ("idx", "pos"):
            a = np.full(layer[name].shape, -1 if name == "idx" else 0, np.int32)
            a[..., slots] = idx
            new[name] = jnp.asarray(a)
        return new

    return tuple(fill(layer) for layer in init_cache(cfg, batch, context))


def measure(cfg: ModelConfig, params, batch: int, context: int, steps: int,
            repeats: int) -> tuple[float, int]:
    """(decode tokens/s, measured cache bytes) for `steps` tokens ending at `context`."""
    rng = np.random.default_rng(0)
    filled = context - steps
    lengths = jnp.full((batch,), filled, jnp.int32)
    logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    sampling = (jnp.float32(1), jnp.int32(cfg.vocab_size), jnp.float32(1))

    def run():
        cache = filled_cache(cfg, batch, context, filled, rng)
        nbytes = cache_bytes(cache)
        start = time.perf_counter()
        _, tokens, _ = decode(cfg, params, cache, logits, lengths, jax.random.key(0), *sampling, steps=steps,
                              greedy=True, keep_logits=False)
        tokens.block_until_ready()
        return time.perf_counter() - start, nbytes

    run()  # compile
    best = min(run()[0] for _ in range(repeats))
    return batch * steps / best, run()[1]


def fmt_bytes(x: float) -> str:
    for scale, unit in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def plot(results: dict, contexts: list[int], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in results.items():
        speed.plot(contexts, [r["tok_s"] for r in rows], marker="o", label=name)
        line, = memory.plot(contexts, [r["measured"] / 2 ** 20 for r in rows], marker="o", label=name)
        memory.plot(contexts, [r["formula"] / 2 ** 20 for r in rows], ls="none", marker="x", ms=9,
                    color=line.get_color())
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    speed.set_ylabel("decode tokens / s")
    speed.set_title("decode speed (higher is better)")
    memory.set_yscale("log")
    memory.set_ylabel("KV cache (MiB); x = accounting.kv_cache_bytes")
    memory.set_title("cache memory")
    speed.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, three contexts, few steps")
    parser.add_argument("--batch", type=int, default=None,
                        help="sequences decoded together (default 4, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="tokens decoded per measurement (default 32)")
    parser.add_argument("--out", type=pathlib.Path, help="where the plot goes",
                        default=pathlib.Path("benchmarks/out/decode_kv_cache.png"))
    args = parser.parse_args(argv)
    batch = args.batch or (2 if args.quick else 4)
    steps = args.steps or (8 if args.quick else 32)
    contexts = [128, 512, 1024] if args.quick else [128, 256, 512, 1024, 2048, 4096]
    repeats = 1 if args.quick else 3

    print(f"{jax.devices()[0].platform}, batch {batch}, {steps} decode steps per measurement",
          file=sys.stderr)
    header = f"{'layout':<18} {'K':>2} {'context':>7} {'decode tok/s':>12} {'cache measured':>15} " \
             f"{'accounting':>12} {'equal':>5} {'vs MHA':>7}"
    print(header)
    print("-" * len(header))
    results, mha = {}, {}
    for name, cfg in layouts(args.quick).items():
        params = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        rows = results[name] = []
        for context in contexts:
            tok_s, measured = measure(cfg, params, batch, context, steps, repeats)
            formula = accounting.kv_cache_bytes(cfg, batch, context)
            mha.setdefault(context, tok_s)
            rows.append(dict(tok_s=tok_s, measured=measured, formula=formula))
            print(f"{name:<18} {cfg.resolved_n_kv_heads:>2} {context:>7} {tok_s:>12.0f} "
                  f"{fmt_bytes(measured):>15} "
                  f"{fmt_bytes(formula):>12} {'yes' if measured == formula else 'NO':>5} "
                  f"{tok_s / mha[context]:>6.2f}x", flush=True)
    plot(results, contexts, args.out)
    print(f"plot: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
