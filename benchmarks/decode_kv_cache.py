"""Decode speed and KV-cache bytes of MHA, GQA and MQA (and a sliding window) at contexts 128..4096.

The lecture's case for MQA / GQA and for sliding windows is memory traffic during decoding: every new
token reads the whole cache. This measures, for one small model in each head layout, the decode
tokens/s of `lecture3.decoding.decode` (one compiled loop over the cached step) at a given context, and
the bytes of K and V actually held, next to `accounting.kv_cache_bytes`.

    python benchmarks/decode_kv_cache.py            # contexts 128..4096, table + PNG
    python benchmarks/decode_kv_cache.py --quick    # a small model and two contexts: a smoke run

The cache is filled synthetically up to the context (the cost of a step depends on how many keys it
reads, not on their values), then `--steps` tokens are decoded and timed (compilation excluded).
Ratios are from one run on whatever machine this is; they are never asserted in tests.

    python benchmarks/decode_kv_cache.py --vs-hf    # lecture3.generate vs transformers' generate only

--vs-hf (also part of the full run) sets lecture3's `generate` against transformers' `generate` on the
same weights: a random small Llama (d 256, 4 layers, GQA 8:2, vocab 8192) built in transformers, saved,
and read by `lecture3.hf.load_pretrained`; greedy, batch 4, 64-token prompts, 128 new tokens, both
end to end (prefill + decode, compilation excluded), float32 on the CPU, rounds interleaved in this one
process so a load that comes and goes hits both; it prints each side's tokens/s and the ratio, and
whether the two produced the same tokens.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lecture3 import accounting
from lecture3.config import ModelConfig
from lecture3.decoding import decode, generate
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


HF_LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=8192, max_position_embeddings=1024)
HF_QUICK = dict(HF_LLAMA, hidden_size=64, num_hidden_layers=2, vocab_size=512, intermediate_size=128)


def vs_transformers(batch: int, prompt: int, new: int, rounds: int, quick: bool) -> dict:
    """lecture3 `generate` vs transformers' `generate`, greedy, on one random Llama's weights, interleaved."""
    import torch
    import transformers

    from lecture3 import hf

    torch.manual_seed(0)
    sizes = HF_QUICK if quick else HF_LLAMA
    config = transformers.LlamaConfig(**sizes, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    reference = transformers.LlamaForCausalLM(config).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        cfg, params = hf.load_pretrained(tmp)
    prompts = np.random.default_rng(0).integers(0, sizes["vocab_size"], (batch, prompt)).astype(np.int32)
    ids = torch.from_numpy(prompts.astype(np.int64))
    mask = torch.ones_like(ids)

    def theirs():
        with torch.inference_mode():
            return reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                      min_new_tokens=new, pad_token_id=0)[:, prompt:].numpy()

    def ours():
        return np.asarray(generate(cfg, params, prompts, new))[:, prompt:]

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    _, ours_tokens = timed(ours)  # compile
    _, theirs_tokens = timed(theirs)  # warm up
    seconds = {"lecture3": [], "transformers": []}
    for r in range(rounds):
        for name, fn in ((("lecture3", ours), ("transformers", theirs)) if r % 2 == 0 else
                         (("transformers", theirs), ("lecture3", ours))):
            seconds[name].append(timed(fn)[0])
    tok_s = {name: batch * new / statistics.median(ts) for name, ts in seconds.items()}
    return dict(tok_s=tok_s, seconds=seconds, ratio=tok_s["lecture3"] / tok_s["transformers"],
                same_rows=int((ours_tokens == theirs_tokens).all(axis=1).sum()), batch=batch, new=new,
                prompt=prompt, threads=torch.get_num_threads(), transformers=transformers.__version__,
                torch=torch.__version__)


def print_vs_transformers(res: dict) -> None:
    print(f"\ngreedy generate, batch {res['batch']}, prompt {res['prompt']}, {res['new']} new tokens, same "
          f"weights (transformers {res['transformers']}, torch {res['torch']}, {res['threads']} threads); "
          f"median of {len(res['seconds']['lecture3'])} interleaved rounds")
    header = f"{'generate':<14} {'median s':>9} {'tok/s':>9} {'all rounds (s)':<40}"
    print(header)
    print("-" * len(header))
    for name, ts in res["seconds"].items():
        print(f"{name:<14} {statistics.median(ts):>9.3f} {res['tok_s'][name]:>9.0f} "
              + " ".join(f"{t:.3f}" for t in ts))
    print(f"lecture3 / transformers tokens/s: {res['ratio']:.2f}x; identical rows: {res['same_rows']}/{res['batch']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, two contexts, few steps")
    parser.add_argument("--batch", type=int, default=None,
                        help="sequences decoded together (default 4, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="tokens decoded per measurement (default 32)")
    parser.add_argument("--vs-hf", action="store_true",
                        help="only lecture3 generate vs transformers' generate (greedy, same weights)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of --vs-hf (default 5)")
    parser.add_argument("--out", type=pathlib.Path, help="where the plot goes",
                        default=pathlib.Path("benchmarks/out/decode_kv_cache.png"))
    args = parser.parse_args(argv)
    batch = args.batch or (2 if args.quick else 4)
    steps = args.steps or (8 if args.quick else 32)
    contexts = [128, 512] if args.quick else [128, 256, 512, 1024, 2048, 4096]
    repeats = 1 if args.quick else 3
    if args.vs_hf:
        print_vs_transformers(vs_transformers(batch if args.batch else 4, 16 if args.quick else 64,
                                              16 if args.quick else 128, args.rounds or (2 if args.quick else 5),
                                              args.quick))
        return 0

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
    print_vs_transformers(vs_transformers(batch if args.batch else 4, 16 if args.quick else 64,
                                          16 if args.quick else 128, args.rounds or (2 if args.quick else 5),
                                          args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
