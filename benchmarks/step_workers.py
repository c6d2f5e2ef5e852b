"""The worker protocol of benchmarks/train_step_vs_torch.py: one process per variant, timed round by round.

A worker (this file run as a script) sets its variant up, compiles, warms up and prints `{"ready": info}`;
then for each `run` line on its stdin it times one round of steps and prints `{"times": [...]}` (the
reference workers add `"peak"`, a matmul's FLOP/s measured in the same round); any other line ends it.
XLA flags reach a worker through its environment, before its backend starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
from step_variants import VARIANTS, apply_settings, batch_splits, jax_setup
from torch_reference import torch_batch, torch_trainer


def time_steps(run, steps: int, sync) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(run())
        out.append(time.perf_counter() - t0)
    return out


def best_time(run, seconds: float = 0.25) -> float:
    """The fastest of `run()`'s calls over `seconds` (after one warm-up call)."""
    run()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def jax_matmul_peak(n: int = 1024) -> float:
    """FLOP/s of a jitted float32 n x n matmul (the best of short bursts)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n ** 3 / best_time(lambda: f(a, a).block_until_ready())


def torch_matmul_peak(n: int = 1024) -> float:
    import torch

    a = torch.randn(n, n)
    return 2 * n ** 3 / best_time(lambda: a @ a)


def serve(info: dict, run_round, peak) -> None:
    """The worker loop: announce readiness, then time one round per `run` line until `quit`."""
    print(json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        reply = {"times": run_round()}
        if peak is not None:
            reply["peak"] = peak()
        print(json.dumps(reply), flush=True)


def hlo_counts(step, state, batch, mesh, rules) -> dict:
    """Ops of the compiled step's entry computation: dots, transposing copies feeding them, fusions."""
    import flax.linen as nn
    import jax

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        text = step.jitted.lower(state, batch).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    bodies = {mt.group(1): mt.group(2) for mt in
              re.finditer(r"^%?(\S+) \(.*?\{\n(.*?)\n\}", text, re.S | re.M)}
    lines = [ln for ln in entry.splitlines() if " = " in ln]
    # short keys: they are the columns of the table. A scanned stack's layers sit in a while body,
    # which is not the entry computation: its counts are not comparable to the unrolled ones.
    out = {"entry ops": len(lines), "fusions": 0, "dots": text.count(" dot("), "unfused dots": 0,
           "ynn fusions": 0, "transposes": 0, "->dot": 0}
    producers = {}
    for ln in lines:
        name = ln.split(" = ")[0].strip().lstrip("%")
        called = re.search(r"calls=%?([\w.\-]+)", ln)
        body = bodies.get(called.group(1), "") if called else ""
        transposing = (" transpose(" in body or " copy(" in body) and " dot(" not in body
        producers[name] = transposing
        out["fusions"] += " fusion(" in ln
        out["ynn fusions"] += "__ynn_fusion" in ln
        out["unfused dots"] += " dot(" in ln
        out["transposes"] += " fusion(" in ln and transposing
    for ln in lines:
        if " dot(" in ln or ("__ynn_fusion" in ln and " dot(" in bodies.get(
                (re.search(r"calls=%?([\w.\-]+)", ln) or [None, ""])[1], "")):
            args = re.findall(r"%([\w.\-]+)", ln.split("(", 1)[1].split(")", 1)[0])
            out["->dot"] += sum(producers.get(a, False) for a in args)
    return out


def jax_worker(name: str, steps: int, hlo: bool, model: str) -> None:
    v = VARIANTS[name]
    applied = apply_settings(v)
    import jax

    from lecture3 import runtime

    step, state, batch, (m, tc, seq_len, mesh, rules) = jax_setup(v, model)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(state)
    info = {"compile_s": time.perf_counter() - t0, "tokens": tc.batch_size * seq_len,
            "devices": len(jax.devices()), "cores": runtime.cpu_cores(),
            "runtime": sorted(k for k, on in applied.items() if on),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "splits": batch_splits(v, m, tc, mesh)}
    if hlo:
        info["hlo"] = hlo_counts(step, state, batch, mesh, rules)
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    held = [state]  # the step donates its state: always feed it the one it returned

    def one_step():
        held[0], _ = step(held[0], batch)
        return held[0]

    serve(info, lambda: time_steps(one_step, steps, jax.block_until_ready),
          jax_matmul_peak if name == "jax" else None)


def torch_worker(name: str, steps: int, params_file: str, threads: int, model: str) -> None:
    import torch

    torch.set_num_threads(VARIANTS[name].threads or threads)
    _, step = torch_trainer(params_file, sdpa=VARIANTS[name].step == "sdpa", model_name=model)
    tokens, targets = torch_batch(model)
    for _ in range(3):
        step(tokens, targets)
    info = {"tokens": int(tokens.numel()), "threads": torch.get_num_threads()}
    serve(info, lambda: time_steps(lambda: step(tokens, targets), steps, lambda x: x),
          torch_matmul_peak if name == "torch" else None)


def worker_env(name: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment of variant `name`'s worker: `environ` with the variant's XLA flags (and its host
    device count) appended to XLA_FLAGS."""
    v, env = VARIANTS[name], dict(environ)
    flags = v.xla_flags + (f" --xla_force_host_platform_device_count={v.devices}" if v.devices > 1 else "")
    if flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    return env


def start_worker(name: str, steps: int, params_file: str, threads: int, model: str, hlo: bool) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), name, "--steps", str(steps), "--params", params_file,
           "--threads", str(threads), "--model", model] + (["--hlo"] if hlo else [])
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=worker_env(name, os.environ))


def read_reply(proc: subprocess.Popen, name: str) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"worker {name} died (exit {proc.wait()}); run it alone: "
                         f"python {sys.argv[0]} --variants jax,{name}")
    return json.loads(line)


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description="one variant's worker (started by "
                                "benchmarks/train_step_vs_torch.py)")
    p.add_argument("name", choices=list(VARIANTS))
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--params", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--hlo", action="store_true")
    args = p.parse_args()
    if VARIANTS[args.name].kind == "torch":
        torch_worker(args.name, args.steps, args.params, args.threads, args.model)
    else:
        jax_worker(args.name, args.steps, args.hlo, args.model)


if __name__ == "__main__":
    main()
