"""Tokens/s of P population members as one vmapped program, P sequential runs, and P pinned processes.

Three ways to train P configs that differ only in seed and peak LR, each timed in the same run:

  population   `lecture3.population`: one jitted program, the members on a leading vmapped axis (this process,
               XLA using every core)
  sequential   P solo runs of `steps.make_train_step`, one after the other (this process, every core)
  processes    P solo runs at once, each a worker process pinned to one core (`os.sched_setaffinity`, XLA's
               Eigen pool off), member i on core i mod cores; the workers compile, wait for each other,
               then time their steps together

tokens/s counts every member's tokens over the timed steps (after one warm-up step), without compilation;
`wall` is the whole set of P runs of `--steps` steps with compilation (and, for processes, start-up). The
batches are random tokens, so no data loading is timed. On a shared machine timings swing: read the ratios.

    python benchmarks/population.py              # small and baseline S (Config(), vocab 2048, 16 x 128), P = 4
    python benchmarks/population.py --quick      # tiny, P = 2, 4 steps, little XLA optimisation: a smoke run
    python benchmarks/population.py --sizes S --members 8 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SIZES = {  # name -> (dotted overrides of Config(), what)
    "tiny": ({"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.vocab_size": 259,
              "model.max_seq_len": 32, "data.seq_len": 32, "train.batch_size": 4}, "d32 L1 V259, 4 x 32"),
    "small": ({"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.vocab_size": 512,
               "model.max_seq_len": 64, "data.seq_len": 64, "train.batch_size": 8}, "d64 L2 V512, 8 x 64"),
    "S": ({"model.vocab_size": 2048, "data.seq_len": 128, "train.batch_size": 16},
          "d128 L4 H4 V2048, 16 x 128 (the baseline)"),
}
LRS = (1e-3, 3e-3, 1e-2)


def n_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))


def size_config(size: str, steps: int):
    from lecture3.config import Config

    return Config().replace(**SIZES[size][0], **{"train.steps": steps + 1, "train.warmup_steps": 1,
                                                 "train.progress": False})


def members(n: int) -> list[dict]:
    return [{"train.seed": i, "train.lr": LRS[i % len(LRS)]} for i in range(n)]


def random_batch(cfg) -> dict[str, np.ndarray]:
    b, t, v = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    toks = np.random.default_rng(0).integers(0, v, (b, t + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((b, t), np.float32)}


def _time(step, state, batch, steps: int) -> tuple[float, float]:
    """(seconds of the first, compiling step; seconds of the next `steps` steps)."""
    import jax

    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return first, time.perf_counter() - t0


def solo(cfg, batch):
    """(jitted step, initial state, batch on device) of one solo run, as lecture3.train builds them."""
    import jax

    from lecture3 import sharding, steps
    from lecture3.config import MeshConfig

    m, tc = cfg.model, cfg.train
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = sharding.axis_rules(m, mesh, tc.batch_size)
    _, shardings = steps.state_shardings(m, tc, mesh, rules)
    step = steps.jit_train_step(steps.make_train_step(m, tc), mesh, rules, shardings)
    return step, steps.init_state(m, tc, mesh, rules, shardings=shardings), jax.device_put(batch)


def run_population(cfg, p: int, steps: int) -> dict:
    import jax

    from lecture3 import population

    t0 = time.perf_counter()
    configs = population.member_configs(cfg, members(p))
    mesh = population.make_mesh(p, jax.devices()[:1])
    step = population.jit_population_step(population.make_population_step(cfg, False), mesh, shared_batch=True)
    state = population.init_population(cfg, configs, mesh)
    first, timed = _time(step, state, jax.device_put(random_batch(cfg)), steps)
    return {"compile": first, "timed": timed, "wall": time.perf_counter() - t0}


def run_sequential(cfg, p: int, steps: int) -> dict:
    t0, first, timed = time.perf_counter(), 0.0, 0.0
    for overrides in members(p):
        f, t = _time(*solo(cfg.replace(**overrides), random_batch(cfg)), steps)
        first, timed = first + f, timed + t
    return {"compile": first, "timed": timed, "wall": time.perf_counter() - t0}


def worker(size: str, member: int, steps: int) -> None:
    """One pinned solo run: compile, say ready, wait for `go`, time the steps, print them."""
    cfg = size_config(size, steps).replace(**members(member + 1)[member])
    step, state, batch = solo(cfg, random_batch(cfg))
    import jax

    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    print(json.dumps({"ready": time.perf_counter() - t0}), flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    print(json.dumps({"timed": time.perf_counter() - t0}), flush=True)


def run_processes(size: str, p: int, steps: int, quick: bool) -> dict:
    cores = n_cores()
    # one core each: no Eigen thread pool; on an accelerator the P processes share it (no preallocation)
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip(),
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", size, "--member", str(i), "--steps", str(steps),
         "--core", str(cores[i % len(cores)])] + (["--quick"] if quick else []),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for i in range(p)]
    ready = [_reply(proc)["ready"] for proc in procs]
    for proc in procs:  # all compiled: start the timed steps together
        proc.stdin.write("go\n")
        proc.stdin.flush()
    timed = [_reply(proc)["timed"] for proc in procs]
    for proc in procs:
        proc.wait()
    return {"compile": max(ready), "timed": max(timed), "wall": time.perf_counter() - t0}


def _reply(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker died (exit {proc.wait()}); run it alone with --worker SIZE --member 0")
    return json.loads(line)


def main(argv: list[str] | None = None) -> dict:
    """Prints the table; returns {size: {mode: tokens/s}}."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny size, 2 members, 4 steps, little XLA optimisation: a smoke run")
    parser.add_argument("--sizes", default=None, help=f"comma-separated, from {', '.join(SIZES)} (default: small,S)")
    parser.add_argument("--members", type=int, default=None, help="P, the members (default: 4; --quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 12; --quick 4)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--member", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 12)
    if args.core is not None:  # pin this worker (and every thread it starts) to one core, before jax starts
        os.sched_setaffinity(0, {args.core})
    if args.quick:  # a smoke run: compile fast, whatever it does to the step time
        import jax

        jax.config.update("jax_disable_most_optimizations", True)
    if args.worker:
        worker(args.worker, args.member, steps)
        return {}
    p = args.members or (2 if args.quick else 4)
    sizes = [s.strip() for s in (args.sizes or ("tiny" if args.quick else "small,S")).split(",")]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")

    import jax

    print(f"{len(n_cores())} cores, jax {jax.__version__} on {jax.devices()[0].device_kind}; P = {p} members "
          f"(seeds 0..{p - 1}, lr {'/'.join(f'{x:g}' for x in LRS)}), {steps} timed steps each after 1 warm-up")
    header = (f"{'size':<6}{'mode':<12}{'tokens/s':>10}{'vs sequential':>15}{'compile s':>11}{'wall s':>8}"
              f"   model, batch")
    print(header + "\n" + "-" * len(header), flush=True)
    out = {}
    for size in sizes:
        cfg = size_config(size, steps)
        tokens = p * steps * cfg.train.batch_size * cfg.data.seq_len
        results = {"population": run_population(cfg, p, steps), "sequential": run_sequential(cfg, p, steps),
                   "processes": run_processes(size, p, steps, args.quick)}
        rates = {mode: tokens / r["timed"] for mode, r in results.items()}
        for mode, r in results.items():
            print(f"{size:<6}{mode:<12}{rates[mode]:>10,.0f}{rates[mode] / rates['sequential']:>14.2f}x"
                  f"{r['compile']:>11.1f}{r['wall']:>8.1f}   {SIZES[size][1]}", flush=True)
        print(f"{size:<6}fastest: {max(rates, key=rates.get)}", flush=True)
        out[size] = rates
    return out


if __name__ == "__main__":
    main()
