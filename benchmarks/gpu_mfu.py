"""Training throughput and MFU of a ~350M-parameter modern model on one device, per attention implementation.

The model (`--size 350m`): d_model 1024, 24 layers, 16 query heads over 4 kv heads (GQA), head_dim 64,
SwiGLU (d_ff 2752), RoPE, pre-RMSNorm, no biases, untied head, vocabulary 32,000: 331M parameters. It
trains on synthetic uniform tokens, bf16 compute with float32 params and AdamW state (the mixed precision
lecture3 supports: `model.dtype="bfloat16"`), with lecture3's own jitted, donating train step
(`steps.make_train_step` -> `steps.jit_train_step`), the one `lecture3 train` runs.

Each step is timed on its own (dispatch to `block_until_ready` of the returned state) after the compile and
`--warmup` untimed steps; the table gives the median. MFU = tokens/s x training FLOPs per token / the
device's dense peak in the compute dtype. FLOPs per token come from `lecture3.accounting.flops_per_token`:
6 x (the matmul weights: q/k/v/o, MLP and the D x V head; the embedding gather is free) plus attention
3 x 4 x N x H x T per layer, every query charged all T keys (PaLM's 6N + 12 L H Q T, what `lecture3 train`
logs as `mfu`); `MFU causal` charges only the visible keys, about half the attention FLOPs. The peak comes
from `lecture3.meter.PEAK_TFLOPS` keyed by `device_kind` (H100 SXM / H200 989, A100 312, L4 121 TFLOP/s
bf16, ...); an unknown accelerator or a CPU has no published peak and prints MFU n/a unless
`--peak-tflops` is given.

    python benchmarks/gpu_mfu.py                                   # 350m, dense and cudnn, 30 timed steps
    python benchmarks/gpu_mfu.py --attention-impl cudnn --batch 8 --json /tmp/mfu.json
    python benchmarks/gpu_mfu.py --size tiny --steps 3 --attention-impl dense,chunked   # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import numpy as np

# name -> (model, batch, seq_len): the model config's fields (on top of ModelConfig's defaults)
SIZES: dict[str, tuple[dict, int, int]] = {
    # ~350M: Llama-style (GQA 16/4, SwiGLU, RoPE theta 500k, RMSNorm, untied head), Mistral's 32k vocabulary
    "350m": (dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4, max_seq_len=2048,
                  rope_theta=500_000.0, tie_embeddings=False), 4, 2048),
    # a few M parameters, short sequences: a CPU smoke run (chunks of 32 so `chunked` really chunks)
    "tiny": (dict(vocab_size=4096, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                  tie_embeddings=False, attention_chunk=32), 2, 128),
}


def model_config(size: str, impl: str, args):
    """The ModelConfig of `size` with `attention_impl=impl`; a clear SystemExit if lecture3 cannot take it."""
    from lecture3.config import ModelConfig

    base = SIZES[size][0]
    changes = dict(base, dtype=args.dtype, qk_norm=args.qk_norm, remat=args.remat, scan_layers=args.scan,
                   max_seq_len=max(base["max_seq_len"], args.seq_len))
    if "attention_impl" in {f.name for f in dataclasses.fields(ModelConfig)}:
        changes["attention_impl"] = impl
    elif impl != "dense":  # without the field, the dense product is the only attention there is
        raise SystemExit(f"--attention-impl {impl}: this lecture3's ModelConfig has no field `attention_impl` "
                         "(dense / chunked / cudnn), so only 'dense' can run; update lecture3 for the others")
    else:
        changes.pop("attention_chunk", None)
    try:
        return ModelConfig(**changes)
    except ValueError as e:  # the config's own message names the field, the value and what is allowed
        raise SystemExit(f"--attention-impl {impl}: {e}") from None


def peak_flops(dtype: str, configured_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s of device 0 in `dtype`, where it comes from); None on a CPU or an unknown device."""
    import jax

    from lecture3 import meter

    dev = jax.devices()[0]
    if configured_tflops is not None:
        return configured_tflops * 1e12, f"--peak-tflops {configured_tflops:g}"
    if dev.platform == "cpu":  # meter.peak_flops_per_device would time a matmul: not a published peak
        return None, "n/a: a CPU has no published dense peak (pass --peak-tflops N to get an MFU)"
    peak = meter.peak_flops_per_device(None, dtype, dev)
    if peak is None:
        return None, (f"n/a: {dev.device_kind!r} has no {dtype} entry in lecture3.meter.PEAK_TFLOPS "
                      "(pass --peak-tflops N, its dense peak, to get an MFU)")
    return peak, f"{peak / 1e12:.1f} TFLOP/s dense {dtype} ({dev.device_kind}, lecture3.meter.PEAK_TFLOPS)"


def synthetic_batches(vocab: int, batch: int, seq_len: int, n: int = 4) -> list[dict[str, np.ndarray]]:
    """`n` distinct batches of uniform random tokens (next-token targets), reused in turn."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        toks = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
        out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:]})
    return out


def bench(cfg, batch: int, seq_len: int, n_steps: int, warmup: int) -> dict:
    """Compile, warm up and time `n_steps` single steps of lecture3's jitted train step on device 0."""
    import jax

    from lecture3 import sharding, steps
    from lecture3.config import MeshConfig, TrainConfig

    train = TrainConfig(steps=max(n_steps + warmup + 1, 2), batch_size=batch, lr=3e-4, final_lr=3e-5,
                        warmup_steps=0, progress=False)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = sharding.axis_rules(cfg, mesh, batch)
    _, shardings = steps.state_shardings(cfg, train, mesh, rules)
    state = steps.init_state(cfg, train, mesh, rules, shardings=shardings)
    step = steps.jit_train_step(steps.make_train_step(cfg, train), mesh, rules, shardings)
    data = sharding.batch_sharding(mesh, rules)
    batches = [jax.device_put(b, data) for b in synthetic_batches(cfg.vocab_size, batch, seq_len)]

    t0 = time.perf_counter()
    state, metrics = step(state, batches[0])  # the step donates its state: always keep the returned one
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    losses = [float(metrics["loss"])]
    for i in range(warmup):
        state, metrics = step(state, batches[(i + 1) % len(batches)])
    jax.block_until_ready(state)
    times = []
    for i in range(n_steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batches[(warmup + i + 1) % len(batches)])
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
    stats = jax.devices()[0].memory_stats() or {}
    del state, metrics
    return {"compile_s": compile_s, "step_s": times, "median_step_s": statistics.median(times),
            "first_loss": losses[0], "last_loss": losses[-1], "peak_bytes": stats.get("peak_bytes_in_use")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="350m", help="model preset (default 350m)")
    p.add_argument("--attention-impl", default="dense,cudnn",
                   help="comma list of ModelConfig.attention_impl values: dense, chunked, cudnn (default dense,cudnn)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per attention impl (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compiling one (default 3)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the size's, 350m: 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the size's, 350m: 2048)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype (params and AdamW state stay float32; default bfloat16)")
    p.add_argument("--qk-norm", default=None, choices=["per_head", "full"], help="qk-norm (default off)")
    p.add_argument("--remat", default=None, choices=["full", "dots", "dots_no_batch"], help="remat (default off)")
    p.add_argument("--scan", action="store_true", help="scan_layers=True")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak per device, overrides the table")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here as JSON")
    args = p.parse_args(argv)
    _, default_batch, default_seq = SIZES[args.size]
    args.batch = args.batch or default_batch
    args.seq_len = args.seq_len or default_seq
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq_len < 1:
        p.error("--steps, --batch and --seq-len must be positive and --warmup at least 0")
    impls = [s.strip() for s in args.attention_impl.split(",") if s.strip()]
    cfgs = {impl: model_config(args.size, impl, args) for impl in impls}  # every impl checked before compute

    import jax

    from lecture3 import accounting

    cfg0 = next(iter(cfgs.values()))
    params = accounting.param_counts(cfg0)
    fpt = accounting.flops_per_token(cfg0, args.seq_len)["training"]
    fpt_causal = accounting.flops_per_token(cfg0, args.seq_len, causal=True)["training"]
    peak, peak_note = peak_flops(args.dtype, args.peak_tflops)
    dev = jax.devices()[0]
    tokens = args.batch * args.seq_len
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}")
    print(f"model {args.size}: {params['total'] / 1e6:.1f}M params ({params['non_embedding'] / 1e6:.1f}M "
          f"non-embedding), d_model {cfg0.d_model}, {cfg0.n_layers} layers, {cfg0.n_heads} heads / "
          f"{cfg0.resolved_n_kv_heads} kv, {cfg0.activation}, {cfg0.position}, {cfg0.norm}, vocab "
          f"{cfg0.vocab_size}, compute {cfg0.dtype} / params {cfg0.param_dtype}, qk_norm {cfg0.qk_norm}, "
          f"remat {cfg0.remat}, scan {cfg0.scan_layers}")
    print(f"batch {args.batch} x seq {args.seq_len} = {tokens} tokens/step; {args.warmup} warm-up + "
          f"{args.steps} timed steps per impl")
    print(f"training FLOPs/token (lecture3.accounting): {fpt / 1e9:.3f} GFLOP = 6N + attention with all "
          f"T keys per query (PaLM); {fpt_causal / 1e9:.3f} GFLOP counting only the causal keys")
    print(f"peak: {peak_note}")
    header = (f"{'attention':<10}{'compile s':>10}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>8}"
              f"{'MFU causal':>12}{'peak mem':>10}{'loss first->last':>19}")
    print("\n" + header + "\n" + "-" * len(header), flush=True)
    results, failed = [], []
    for impl, cfg in cfgs.items():
        try:
            r = bench(cfg, args.batch, args.seq_len, args.steps, args.warmup)
        except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: report it, go on with the next impl
            msg = str(e).strip().splitlines()[0][:160]
            print(f"{impl:<10} failed: {msg}", flush=True)
            failed.append(impl)
            results.append({"attention_impl": impl, "error": msg})
            continue
        tps = tokens / r["median_step_s"]
        mfu = tps * fpt / peak if peak else None
        mfu_causal = tps * fpt_causal / peak if peak else None
        pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
        mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f}G"
        print(f"{impl:<10}{r['compile_s']:>10.1f}{1e3 * r['median_step_s']:>10.1f}{tps:>12.0f}"
              f"{tps * fpt / 1e12:>9.2f}{pct(mfu):>8}{pct(mfu_causal):>12}{mem:>10}"
              f"{r['first_loss']:>10.3f}->{r['last_loss']:.3f}", flush=True)
        results.append({"attention_impl": impl, "tokens_per_s": tps, "mfu": mfu, "mfu_causal": mfu_causal,
                        "achieved_flops_per_s": tps * fpt, **r})
    if peak is None:
        print(f"MFU {peak_note}")
    if args.json:
        out = {"device_kind": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
               "size": args.size, "batch": args.batch, "seq_len": args.seq_len, "warmup": args.warmup,
               "params": params["total"], "training_flops_per_token": fpt,
               "training_flops_per_token_causal": fpt_causal, "peak_flops_per_s": peak, "peak": peak_note,
               "model": cfg0.to_dict() | {"attention_impl": None}, "results": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
