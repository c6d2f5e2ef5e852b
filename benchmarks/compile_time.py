"""Compile time of lecture3's train step with and without `scan_layers`, as the depth grows.

For each depth of `--layers` and scan_layers False / True, the train step that `lecture3 train` runs
(`steps.make_train_step` -> `steps.jit_train_step`: forward, backward, AdamW, diagnostics) of the default
model width (`Config()`: d_model 128, 4 heads, SwiGLU, RoPE, batch 16 x 128 tokens) is compiled ahead of
time on abstract inputs: `jitted.lower(state, batch)` (trace + StableHLO) and `.compile()` (XLA) are timed
separately, with no parameters ever created. jax's caches are cleared before each measurement and the
persistent compilation cache is off, so nothing compiled earlier is reused; one warm-up compile first pays
the process's one-time costs. Printed: the times (the median of `--repeats`) and the ratio deepest /
shallowest for each mode: unrolled layers compile in time that grows with depth, a scanned stack compiles
one layer group whatever the depth.

    python benchmarks/compile_time.py                  # layers 4,32: about a minute on 2 cores
    python benchmarks/compile_time.py --layers 1,2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def compile_once(n_layers: int, scan: bool) -> tuple[float, float]:
    """(seconds to trace and lower, seconds for XLA to compile) the train step of a `n_layers` model."""
    import flax.linen as nn
    import jax

    from lecture3 import sharding, steps
    from lecture3.config import Config, MeshConfig

    cfg = Config()
    model = cfg.model.replace(n_layers=n_layers, scan_layers=scan)
    train, seq_len = cfg.train, cfg.data.seq_len
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = sharding.axis_rules(model, mesh, train.batch_size)
    abstract, shardings = steps.state_shardings(model, train, mesh, rules)
    data = sharding.batch_sharding(mesh, rules)
    tokens = jax.ShapeDtypeStruct((train.batch_size, seq_len), jax.numpy.int32, sharding=data)
    batch = {"inputs": tokens, "targets": tokens}
    splits = steps.batch_splits(model, train, mesh)  # the step lecture3 runs on this mesh
    step = steps.jit_train_step(steps.make_train_step(model, train, splits=splits), mesh, rules, shardings)
    jax.clear_caches()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # as the step runs: the activation constraints apply
        t0 = time.perf_counter()
        lowered = step.jitted.lower(abstract, batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="4,32", help="comma list of depths (default 4,32)")
    p.add_argument("--repeats", type=int, default=1, help="compiles per (depth, scan); the median is shown")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the discarded first compile")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here as JSON")
    args = p.parse_args(argv)
    try:
        depths = sorted({int(s) for s in args.layers.split(",") if s.strip()})
    except ValueError:
        p.error(f"--layers {args.layers!r}: expected a comma list of positive integers, e.g. 4,32")
    if len(depths) < 2 or depths[0] < 1 or args.repeats < 1:
        p.error("--layers needs at least two distinct positive depths, --repeats at least 1")

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; Config() width (d_model 128, "
          f"4 heads), batch 16 x 128; AOT jitted.lower(abstract state, batch) then .compile(); "
          f"median of {args.repeats}")
    from lecture3 import sharding, steps
    from lecture3.config import Config, MeshConfig

    cfg = Config()
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    print(f"the layers take the batch in {steps.batch_splits(cfg.model, cfg.train, mesh)} part(s), "
          "as lecture3 train does on this one-device mesh (steps.batch_splits)")
    if args.warmup:
        t0 = time.perf_counter()
        compile_once(depths[0], True)
        print(f"warm-up compile (discarded): {time.perf_counter() - t0:.1f} s", flush=True)
    header = f"{'layers':>6}  {'scan':<6}{'lower s':>9}{'compile s':>11}{'total s':>9}"
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for n in depths:
        for scan in (False, True):
            runs = [compile_once(n, scan) for _ in range(args.repeats)]
            lower = statistics.median(r[0] for r in runs)
            comp = statistics.median(r[1] for r in runs)
            total = statistics.median(r[0] + r[1] for r in runs)
            rows.append({"layers": n, "scan_layers": scan, "lower_s": lower, "compile_s": comp, "total_s": total})
            print(f"{n:>6}  {str(scan):<6}{lower:>9.2f}{comp:>11.2f}{total:>9.2f}", flush=True)
    lo, hi = depths[0], depths[-1]
    total = {(r["layers"], r["scan_layers"]): r["total_s"] for r in rows}
    ratios = {scan: total[hi, scan] / total[lo, scan] for scan in (False, True)}
    print(f"ratio {hi}/{lo} layers (lower + compile): unscanned {ratios[False]:.2f}x, "
          f"scanned {ratios[True]:.2f}x")
    for n in depths:
        print(f"  at {n} layers, scanned / unscanned: {total[n, True] / total[n, False]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device_kind": dev.device_kind, "jax": jax.__version__, "rows": rows,
                       "ratio": {"layers": [lo, hi], "unscanned": ratios[False], "scanned": ratios[True]}},
                      f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
