"""Long context: what a local layer and the chunked attention cost as T grows, in one run.

    python benchmarks/long_context.py                   # the issue's two checks, ~10 min on 2 CPU cores
    python benchmarks/long_context.py --quick           # the code path in seconds (tests)

1. An all-local model (window 256) at T = 256 and T = 4096 with the same tokens per step (batch x T):
   step time per token and peak memory, as ratios T=4096 / T=256 (the target: at most 2x each). Its
   local layers compute blocks of the window (`attention_impl="dense"`), T x 2 window, not T x T.
2. A global model at T = 8192 (batch 1): attention_impl dense vs chunked, step time and peak memory.
   Dense holds the T x T logits of every layer for the backward; chunked holds O(T x chunk).

Each configuration trains in its own child process (`--child`), so its peak resident memory is its own:
the parent polls it and kills a child past `--max-gib` (reported as over the limit, the machine safe).
The step is lecture3's own jitted train step (`steps.make_train_step`), on synthetic tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODEL = dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4)


def child(spec: dict) -> dict:
    import resource

    import jax
    import numpy as np

    from lecture3 import sharding, steps
    from lecture3.config import MeshConfig, ModelConfig, TrainConfig

    cfg = ModelConfig(**MODEL, max_seq_len=spec["seq_len"], **spec["model"])
    batch, t = spec["batch"], spec["seq_len"]
    train = TrainConfig(steps=spec["steps"] + 2, batch_size=batch, lr=1e-3, final_lr=1e-4, warmup_steps=0,
                        progress=False)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = sharding.axis_rules(cfg, mesh, batch)
    _, shardings = steps.state_shardings(cfg, train, mesh, rules)
    state = steps.init_state(cfg, train, mesh, rules, shardings=shardings)
    step = steps.jit_train_step(steps.make_train_step(cfg, train), mesh, rules, shardings)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, t + 1), dtype=np.int32)
    data = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                          sharding.batch_sharding(mesh, rules))
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "step_s": statistics.median(times), "loss": float(metrics["loss"]),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_child(spec: dict, max_gib: float) -> dict:
    """Run `spec` in a child process; kill it past max_gib resident (then {"over_limit": True})."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20
            peak = max(peak, rss)
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        if peak > max_gib:
            proc.kill()
            proc.wait()
            return {"over_limit": True, "peak_rss_gib": peak}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"failed": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def show(name: str, tokens: int, r: dict) -> str:
    if r.get("over_limit"):
        return f"{name:<34} over the memory limit (killed at {r['peak_rss_gib']:.1f} GiB resident)"
    if "failed" in r:
        return f"{name:<34} failed: {r['failed']}"
    return (f"{name:<34} {r['step_s']:8.3f} s/step {r['step_s'] / tokens * 1e6:8.2f} us/token "
            f"peak {r['peak_rss_gib']:6.2f} GiB  loss {r['loss']:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="tiny sizes: the code path only, no conclusion")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after the compile)")
    p.add_argument("--max-gib", type=float, default=16.0, help="kill a configuration past this resident memory")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    window, short, long_, tokens, global_t, chunk = (256, 256, 4096, 8192, 8192, 512) if not args.quick else (
        8, 8, 64, 128, 128, 32)
    steps_n = 1 if args.quick else args.steps
    import jax

    print(f"lecture3 long context; jax {jax.__version__}, {os.cpu_count()} cpus; model {MODEL}; "
          f"{steps_n} timed steps after the compile, median; peak = the child's peak resident memory")
    local = {"sliding_window": window, "layer_pattern": ["local"]}
    rows = {}
    print(f"\n1. all-local, window {window}, {tokens} tokens per step")
    for t in (short, long_):
        spec = {"model": local, "seq_len": t, "batch": tokens // t, "steps": steps_n}
        rows[t] = run_child(spec, args.max_gib)
        print(show(f"T={t:<5} batch {tokens // t}", tokens, rows[t]))
    if all("step_s" in r for r in rows.values()):
        print(f"T={long_} / T={short} per token: step time {rows[long_]['step_s'] / rows[short]['step_s']:.2f}x, "
              f"peak memory {rows[long_]['peak_rss_gib'] / rows[short]['peak_rss_gib']:.2f}x (target <= 2x)")
    print(f"\n2. global, T={global_t}, batch 1")
    res = {}
    for impl in ("dense", "chunked"):
        spec = {"model": {"attention_impl": impl, "attention_chunk": chunk}, "seq_len": global_t, "batch": 1,
                "steps": steps_n}
        res[impl] = run_child(spec, args.max_gib)
        print(show(f"{impl} (chunk {chunk})" if impl == "chunked" else impl, global_t, res[impl]))
    if all("step_s" in r for r in res.values()):
        print(f"chunked / dense: step time {res['chunked']['step_s'] / res['dense']['step_s']:.2f}x, "
              f"peak memory {res['chunked']['peak_rss_gib'] / res['dense']['peak_rss_gib']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
