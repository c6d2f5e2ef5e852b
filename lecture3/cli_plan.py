"""`lecture3 plan`: will this run fit that TPU slice? The flags of `lecture3 train` plus `--topology NAME`.

    lecture3 plan --preset llama3:1b --topology v5e:2x2 --model.dtype bfloat16 --model.scan-layers true \
        --model.remat full --mesh.data 1 --mesh.fsdp -1 --train.batch-size 16 --data.seq-len 2048

compiles the train step `lecture3 train` would run for the slice, on this machine (no TPU needed: the
compile-only devices of libtpu, `pip install 'lecture3[tpu]'`), and prints per device the params, the
optimizer state, the batch, XLA's temporaries and their total against the device's HBM, whether it fits,
the compile time and the step's model FLOPs. Exit status 0 when it fits, 1 when it does not, 2 for bad
input (an unknown topology, a mesh that does not divide the slice, no libtpu).
"""

from __future__ import annotations

import argparse
import os

# Set by `lecture3 plan` when unset: libtpu is only asked to compile, so it must not look for the metadata
# server of a Cloud TPU VM, nor for the other hosts and the accelerator of a slice this machine is not part of.
COMPILE_ONLY_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1"}


def _add_plan_args(parser: argparse.ArgumentParser) -> None:
    from lecture3.cli_train import add_config_flags

    parser.add_argument("--topology", required=True, metavar="NAME",
                        help="the TPU slice, GENERATION:SHAPE as libtpu names it: v5e:2x2, v5e:4x4, v5p:2x2x1, "
                             "v6e:2x2, v4:2x2x1, ...")
    add_config_flags(parser)


def _run_plan(args: argparse.Namespace) -> int:
    import logging

    from lecture3 import runtime
    from lecture3.cli_train import config_from_args

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = config_from_args(args)
    env = {k: v for k, v in COMPILE_ONLY_ENV.items() if k not in os.environ}
    os.environ.update(env)
    import jax

    if not runtime.backend_started():  # the model is only traced here: no accelerator of this machine is needed
        jax.config.update("jax_platforms", "cpu")
    from lecture3 import plan
    from lecture3.meter import PEAK_TFLOPS

    devices = plan.topology_devices(args.topology)  # an unknown topology or no libtpu: one line, before anything
    m, t = cfg.model, cfg.train
    print(f"plan: {args.preset or 'the default model'} ({m.dtype}, scan_layers={m.scan_layers}, remat={m.remat}, "
          f"attention_impl={m.attention_impl}), batch {t.batch_size} x {cfg.data.seq_len}, "
          f"loss_chunk={t.loss_chunk}; compiling for {args.topology}"
          + (f" (set {' '.join(f'{k}={v}' for k, v in env.items())})" if env else ""), flush=True)
    p = plan.plan(cfg, args.topology, devices)
    peak = t.peak_tflops or (PEAK_TFLOPS.get(p.device_kind, {}).get(m.dtype) if p.per == "chip" else None)
    print(plan.report(p, peak))
    return 1 if p.fits is False else 0


def command():
    return ("compile the train step for a TPU slice on this machine: per-chip memory, fits or not, FLOPs",
            _add_plan_args, _run_plan)
