"""Will this config fit that TPU slice? The sharded train step compiled ahead of time for a real topology.

`plan(cfg, "v5e:4x4")` builds the step `lecture3 train` runs (`sharding.make_mesh`, `axis_rules`,
`steps.state_shardings`, `make_train_step`, `jit_train_step`) over the compile-only devices of the named
TPU slice (`jax.experimental.topologies`, from the `libtpu` wheel: `pip install 'lecture3[tpu]'`) and
compiles it on this machine, which needs no TPU. Per device (a chip of v5e, v5p and v6e; a TensorCore of
the older generations) it reports the state (params and optimizer, from their shardings), XLA's
temporaries, their sum against the device's HBM (`HBM_GIB`), the compile time and the step's model FLOPs
(`accounting.flops_per_token`: XLA's own cost analysis counts a scanned layer's body once).

A step whose temporaries XLA cannot place fails to compile with RESOURCE_EXHAUSTED; the plan then says
"does not fit" with XLA's figure for them. XLA checks the temporaries alone, so a step that compiles may
still not fit once the state is added: the plan adds it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time

from lecture3.config import Config
from lecture3.errors import Lecture3Error

GIB = 2 ** 30

# device_kind -> the HBM (GiB) XLA makes available on one device of it, as its out-of-memory errors
# report it for the compile-only devices of libtpu 0.0.42 (published per chip: v5e 16 GiB, v5p 95 GiB,
# v6e 32 GiB; v4 and v3 32 GiB per chip of two TensorCores, each its own device here).
HBM_GIB = {
    "TPU v5 lite": 15.75,  # v5e
    "TPU v5": 95.74,  # v5p
    "TPU v6 lite": 31.25,  # v6e (Trillium)
    "TPU v4": 15.25,  # per TensorCore
    "TPU v3": 15.48,  # per TensorCore
}
_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


class PlanError(Lecture3Error):
    """A topology that cannot be resolved, or no libtpu to resolve it with."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one device of the slice holds during a train step, in bytes, and what the step costs."""

    topology: str
    device_kind: str
    devices: int
    per: str  # "chip" or "core": what one device is
    mesh: dict[str, int]
    params: int
    optimizer: int  # the optimizer's moments, the step counter and the RNG key
    batch: int
    temporaries: float  # XLA's: from the compiled step's memory analysis, or from its out-of-memory error
    hbm: float | None  # bytes available on one device (None: a device kind not in HBM_GIB)
    compile_s: float
    step_flops: float  # model FLOPs of one step over the whole slice (accounting: 3 x forward)
    oom: str | None = None  # XLA's RESOURCE_EXHAUSTED line when the step did not compile

    @property
    def state(self) -> int:
        return self.params + self.optimizer

    @property
    def total(self) -> float:
        return self.state + self.batch + self.temporaries

    @property
    def fits(self) -> bool | None:
        """Whether the state, batch and temporaries fit the device's HBM (None: HBM unknown)."""
        if self.oom is not None:
            return False
        return None if self.hbm is None else self.total <= self.hbm


def oom_figures(message: str) -> tuple[float, float] | None:
    """(bytes of temporaries, bytes of HBM available) from XLA's RESOURCE_EXHAUSTED message, or None."""
    m = _OOM.search(message)
    return None if m is None else (float(m[1]) * _UNITS[m[2]], float(m[3]) * _UNITS[m[4]])


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
    """The compile-only devices of the TPU slice `name` (`v5e:4x4`, `v5p:2x2x1`, `v6e:2x2`, ...)."""
    if not libtpu_available():
        raise PlanError(f"compiling for TPU topology {name!r} needs libtpu: pip install 'lecture3[tpu]' (the "
                        "jax[tpu] of the installed jax, about 680 MB)")
    import jax
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"TPU topology {name!r} cannot be resolved ({first}); give GENERATION:SHAPE with a "
                        "shape that libtpu knows, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1, v6e:2x2") from None


def _bytes_per_device(tree) -> int:
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract_batch(cfg: Config, mesh, rules) -> dict:
    """The batch `lecture3 train` feeds (inputs, targets, positions, segment_ids int32; loss_mask float32),
    as sharded shapes."""
    import jax
    import jax.numpy as jnp

    from lecture3 import sharding

    data = sharding.batch_sharding(mesh, rules)
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    out = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=data)
           for k in ("inputs", "targets", "positions", "segment_ids")}
    out["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=data)
    return out


def plan(cfg: Config, topology: str, devices: list | None = None) -> Plan:
    """Compile `cfg`'s train step for the TPU slice `topology` (or the given compile-only `devices`) and
    measure it. Raises `PlanError` for a topology libtpu cannot resolve and `sharding.MeshError` for a mesh
    that does not divide the slice or the batch."""
    import flax.linen as nn
    import jax

    from lecture3 import accounting, sharding, steps

    devices = topology_devices(topology) if devices is None else devices
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch(mesh, cfg.train.batch_size)
    rules = sharding.axis_rules(cfg.model, mesh, cfg.train.batch_size)
    abstract, shardings = steps.state_shardings(cfg.model, cfg.train, mesh, rules)
    step = steps.jit_train_step(steps.make_train_step(cfg.model, cfg.train, splits=1), mesh, rules, shardings)
    batch = abstract_batch(cfg, mesh, rules)
    kind = devices[0].device_kind
    hbm = HBM_GIB.get(kind)
    start, oom, temporaries = time.perf_counter(), None, 0.0
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        try:
            compiled = step.jitted.lower(abstract, batch).compile()
            temporaries = float(compiled.memory_analysis().temp_size_in_bytes)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            oom = next((line.strip() for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line), str(e))
            figures = oom_figures(str(e))
            if figures:
                temporaries = figures[0]
                hbm = figures[1] / GIB if hbm is None else hbm
    compile_s = time.perf_counter() - start
    per_token = accounting.flops_per_token(cfg.model, cfg.data.seq_len)["training"]
    return Plan(
        topology=topology, device_kind=kind, devices=len(devices),
        per="chip" if len({tuple(getattr(d, "coords", (d.id,))) for d in devices}) == len(devices) else "core",
        mesh=dict(mesh.shape), params=_bytes_per_device(abstract.params),
        optimizer=_bytes_per_device((abstract.opt_state, abstract.step, abstract.rng)),
        batch=_bytes_per_device(batch), temporaries=temporaries, hbm=None if hbm is None else hbm * GIB,
        compile_s=compile_s, step_flops=per_token * cfg.train.batch_size * cfg.data.seq_len, oom=oom)


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def report(p: Plan, peak_tflops: float | None = None) -> str:
    """The plan as lines a person reads before booking the slice."""
    mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
    per = f"per {p.per}"
    temps = "XLA's memory analysis" if p.oom is None else "XLA's out-of-memory error: the step did not compile"
    lines = [f"{p.topology}: {p.devices} x {p.device_kind} ({p.per}s), mesh {mesh}",
             f"{per}:",
             f"  params      {_gib(p.params)}",
             f"  optimizer   {_gib(p.optimizer)}",
             f"  batch       {_gib(p.batch)}",
             f"  temporaries {_gib(p.temporaries)}  ({temps})"]
    if p.hbm is None:
        lines.append(f"  total       {_gib(p.total)}  of unknown HBM ({p.device_kind!r} is not in plan.HBM_GIB)")
        verdict = "fit unknown"
    else:
        lines.append(f"  total       {_gib(p.total)}  of {p.hbm / GIB:.2f} GiB HBM ({100 * p.total / p.hbm:.0f}%)")
        verdict = "fits" if p.fits else "does not fit"
    lines.append(f"{verdict}" + (f" ({p.oom})" if p.oom else ""))
    lines.append(f"compile: {p.compile_s:.1f} s")
    per_device = p.step_flops / p.devices
    flops = f"model FLOPs per step: {p.step_flops:.3e} ({per_device:.3e} {per}; accounting.flops_per_token)"
    if peak_tflops:
        flops += f"; {per_device / (peak_tflops * 1e12):.3f} s a step at the peak {peak_tflops:g} TFLOP/s"
    lines.append(flops)
    return "\n".join(lines)
