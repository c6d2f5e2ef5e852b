"""Train-step speed of the default config: lecture3's JAX step against the same model in eager PyTorch.

Prints step time, tokens/s and MFU for `Config()` (d_model 128, 4 layers, 4 heads, SwiGLU, RoPE, tied
embeddings, batch 16 x 128 tokens, AdamW + global-norm clipping) and, in the same run, the same model
written in eager PyTorch (float32, CPU, torch.set_num_threads = the cores JAX uses), plus JAX variants
(XLA flags, bfloat16, scan, remat, a lean step, the batch split over a data mesh of one XLA:CPU host device
per core: benchmarks/step_variants.py). Every variant runs in its own worker process (XLA flags must be set
before the backend starts: benchmarks/step_workers.py); the workers compile once and then take turns, round
after round, so each round times all variants back to back and the ratios are medians of per-round ratios.
Timings on a shared machine swing: read the ratios, not the milliseconds.

First it proves the PyTorch model is the same model: the lecture3 init params are copied into it and the
two losses are printed at init and after a few identical AdamW steps.

`--model llama` runs the same comparison on a small Llama (d 256, 4 layers, GQA 8:2, SwiGLU d_ff 768, RoPE,
untied head, vocab 8192, batch 8 x 256) against transformers' own `LlamaForCausalLM`, loaded from the
lecture3 init params written by `lecture3.hf.save_pretrained` and trained with `torch.optim.AdamW` and
clipping (`torch`: eager attention, `torch_sdpa`: attn_implementation="sdpa"). Every JAX variant applies to
it: variants only use public switches (benchmarks/step_variants.py), none has a forward of its own.

    python benchmarks/train_step_vs_torch.py            # default: ~3-5 minutes on 2 cores
    python benchmarks/train_step_vs_torch.py --quick    # a smoke run: 2 rounds of 2 steps
    python benchmarks/train_step_vs_torch.py --variants jax,torch,jax_lean --hlo
    python benchmarks/train_step_vs_torch.py --model llama --variants jax,torch,torch_sdpa,jax_xla_defaults
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from step_variants import DEFAULT_VARIANTS, MODELS, VARIANTS, bench_config
from step_workers import read_reply, start_worker
from torch_reference import check_same_model, save_params


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 steps: a smoke run")
    p.add_argument("--rounds", type=int, default=None, help="rounds of interleaved timing (default 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 3)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--hlo", action="store_true", help="count dots and transposing copies in each step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores JAX uses)")
    p.add_argument("--model", choices=[name for name, _ in MODELS], default="default",
                   help="; ".join(f"{name}: {doc}" for name, doc in MODELS))
    args = p.parse_args()
    from lecture3 import runtime
    from lecture3.accounting import flops_per_token

    args.rounds = args.rounds or (2 if args.quick else 4)
    args.steps = args.steps or (2 if args.quick else 3)
    threads = args.threads or runtime.cpu_cores()
    names = [n.strip() for n in (args.variants or ",".join(DEFAULT_VARIANTS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    names = ["jax", "torch"] + [n for n in names if n not in ("jax", "torch")]

    cfg = bench_config(args.model)
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)["training"]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        params_file = os.path.join(tmp, "hf" if args.model == "llama" else "params.npz")
        jax_init, jax_losses = save_params(params_file, args.model)
        check_same_model(params_file, jax_init, jax_losses, threads, args.model)
        m = cfg.model
        print(f"model {args.model}: d_model {m.d_model}, {m.n_layers} layers, heads {m.n_heads}:"
              f"{m.resolved_n_kv_heads}, d_ff {m.resolved_d_ff}, vocab {m.vocab_size}, "
              f"{'tied' if m.tie_embeddings else 'untied'} head; batch {cfg.train.batch_size} x "
              f"{cfg.data.seq_len}" + ("; torch = transformers LlamaForCausalLM" if args.model == "llama" else ""))
        print(f"cores: {runtime.cpu_cores()} (XLA:CPU uses them all); torch.set_num_threads({threads}); "
              f"{args.rounds} rounds x {args.steps} steps per variant; training FLOPs/token "
              f"{flops_tok / 1e6:.2f} M (lecture3.accounting, seq_len {cfg.data.seq_len})")
        # all workers start (import, init, compile) at once: their compile times overlap and are not
        # comparable, but startup stays short; then only one of them runs at any time
        workers = {name: start_worker(name, args.steps, params_file, threads, args.model, args.hlo)
                   for name in names}
        infos = {}
        for name in names:
            infos[name] = read_reply(workers[name], name)["ready"]
        print(f"  {len(names)} workers ready after {time.perf_counter() - t_start:.0f} s", flush=True)
        times = {n: [] for n in names}
        peaks = {"jax": [], "torch": []}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
            for name in order:
                workers[name].stdin.write("run\n")
                workers[name].stdin.flush()
                reply = read_reply(workers[name], name)
                times[name].append(reply["times"])
                if "peak" in reply:
                    peaks[name].append(reply["peak"])
            print(f"  round {r + 1}/{args.rounds}: jax {1e3 * np.median(times['jax'][-1]):.0f} ms, "
                  f"torch {1e3 * np.median(times['torch'][-1]):.0f} ms", flush=True)
        for w in workers.values():
            w.stdin.write("quit\n")
            w.stdin.flush()
            w.wait()
    report(names, times, peaks, infos, flops_tok, args.hlo, args.model)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


def describe(name: str, model: str) -> str:
    """The table's `what` column: on the llama comparison the torch rows are transformers' model."""
    v = VARIANTS[name]
    if model == "llama" and name == "jax":
        return "lecture3 make_train_step, as lecture3 runs it on a CPU (lecture3.runtime)"
    if model != "llama" or v.kind != "torch":
        return v.doc
    threads = f", torch.set_num_threads({v.threads})" if v.threads else ""
    return f"transformers LlamaForCausalLM, attn_implementation={'sdpa' if v.step == 'sdpa' else 'eager'}{threads}"


def report(names, times, peaks, infos, flops_tok: float, hlo: bool, model: str = "default") -> None:
    peak_jax, peak_torch = np.median(peaks["jax"]), np.median(peaks["torch"])
    peak = max(peak_jax, peak_torch)
    print(f"\nmatmul peak (1024x1024 f32, best of bursts, median over rounds): "
          f"jax {peak_jax / 1e9:.1f} GFLOP/s, "
          f"torch {peak_torch / 1e9:.1f} GFLOP/s -> MFU uses {peak / 1e9:.1f} GFLOP/s")
    per_round = {n: np.array([np.median(t) for t in times[n]]) for n in names}
    tokens = infos["jax"]["tokens"]
    header = (f"{'variant':<17}{'ms/step':>9}{'tokens/s':>10}{'MFU':>7}{'speed vs jax':>14}"
              f"{'speed vs torch':>16}   what")
    print("\n" + header + "\n" + "-" * len(header))
    for n in names:
        ms = 1e3 * np.median(np.concatenate(times[n]))
        tps = tokens / (ms / 1e3)
        vs_jax = np.median(per_round["jax"] / per_round[n])  # > 1: faster than the JAX default
        vs_torch = np.median(per_round["torch"] / per_round[n])
        print(f"{n:<17}{ms:>9.1f}{tps:>10.0f}{100 * tps * flops_tok / peak:>6.1f}%{vs_jax:>13.2f}x"
              f"{vs_torch:>15.2f}x   {describe(n, model)}")
    print("speed vs X = median over rounds of (X's round median / variant's round median); > 1 is faster.")
    print("\nas each JAX worker ran: the forward's batch parts; lecture3.runtime settings applied before its backend "
          "started; XLA_FLAGS")
    for n in names:
        if "runtime" in infos[n]:
            print(f"  {n:<17}{infos[n]['splits']:<3}{', '.join(infos[n]['runtime']) or 'none':<30}"
                  f"{infos[n]['xla_flags'] or '-'}")
    if hlo:
        print("\ncompiled step, entry computation: transposes = fusions that transpose/copy without a dot; "
              "->dot = those feeding a dot (scan: the layers are in a while body, not counted)")
        keys = list(next(i["hlo"] for i in infos.values() if "hlo" in i))
        print(f"{'variant':<17}" + "".join(f"{k:>13.13}" for k in keys))
        for n in names:
            if "hlo" in infos[n]:
                print(f"{n:<17}" + "".join(f"{infos[n]['hlo'][k]:>13}" for k in keys))


if __name__ == "__main__":
    main()
