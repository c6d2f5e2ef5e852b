"""The process lecture3 runs in, on a CPU: settings that must be made before jax's backend starts.

`cpu_defaults()` is what the `lecture3` command and the experiment workers do first. Library code
(`lecture3.train` included) never calls it: a notebook that wants the same speed opts in with one call,
`lecture3.runtime.cpu_defaults()`, before anything starts jax. On a CPU backend it

  - lets XLA fuse matmuls through YNNPACK (`--xla_cpu_experimental_ynn_fusion_type=dot`), where the
    installed jaxlib knows the flag;
  - keeps host memory that XLA frees (`keep_host_memory`): XLA:CPU allocates each execution's
    temporaries as one buffer (156 MB for the default train step) from one of its own threads and frees
    it when the step ends. glibc serves a block that large from a thread's arena with a fresh `mmap` and
    returns it with `munmap`, so every step touches every page of it anew: 38,000 page faults and about
    80 ms of kernel time per step of the default model on a 2-core machine, more than a third of the
    step (benchmarks/train_step_vs_torch.py, variant `jax_glibc_malloc`).

Neither changes a number the model computes. `LECTURE3_XLA_DEFAULTS=0` turns both off; a user's own
setting of the XLA flag wins over lecture3's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import typing
from pathlib import Path

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP = {M_ARENA_MAX: 1, M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2 ** 31 - 1}


# What `cpu_defaults` applied in this process (records state it: `experiment.records.environment`).
_applied = {"xla_flags": False, "keep_host_memory": False}


def applied() -> dict[str, bool]:
    """The settings `cpu_defaults` applied in this process so far, by name."""
    return dict(_applied)


def enabled(environ: typing.Mapping[str, str] = os.environ) -> bool:
    return environ.get("LECTURE3_XLA_DEFAULTS", "1") != "0"


def cpu_defaults(keep_memory: bool = True) -> dict[str, bool]:
    """Apply lecture3's CPU settings when the run will be on a CPU and jax's backend has not started
    (after that they would no longer reach XLA's threads). Returns what was applied, by name."""
    applied = {"xla_flags": False, "keep_host_memory": False}
    if not enabled() or not runs_on_cpu(os.environ) or backend_started():
        return applied
    current = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG not in current and jaxlib_knows(YNN_FLAG):
        os.environ["XLA_FLAGS"] = f"{current} --{YNN_FLAG}=dot".strip()
        applied["xla_flags"] = True
    applied["keep_host_memory"] = keep_memory and keep_host_memory()
    _applied.update({k: v for k, v in applied.items() if v})
    return applied


def keep_host_memory() -> bool:
    """Have glibc's malloc keep the memory XLA frees for the next step instead of returning it to the OS.

    One arena for every thread (M_ARENA_MAX=1: a thread's own arena can only `mmap` a block over 64 MB),
    no `mmap` for large blocks (M_MMAP_MAX=0: they come from the heap) and no trimming of the heap's top
    (M_TRIM_THRESHOLD=2 GiB - 1). The price: the process keeps its peak heap, as PyTorch's caching
    allocator does on a GPU. Only with glibc (Linux); elsewhere nothing changes and it returns False.
    XLA's threads take their arena on their first allocation, so call this before jax's backend starts.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in KEEP.items())


@functools.cache
def _glibc_mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def cpu_cores() -> int:
    """The cores this process may run on (its affinity: a worker pinned to one core has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def backend_started() -> bool:
    """Whether jax's backends are up in this process (False when jax is not even imported)."""
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a jax that moved it: then the settings are made and simply do nothing if too late
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def runs_on_cpu(environ: typing.Mapping[str, str]) -> bool:
    """Whether jax's default backend will be the CPU, decided without starting a backend: JAX_PLATFORMS
    names cpu first, or it is unset and no accelerator (a `jax_plugins` module or entry point, as
    jax[cuda] and jax[rocm] install, or libtpu) is installed. In doubt, not CPU: then nothing is set."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    platforms = environ.get("JAX_PLATFORMS", environ.get("JAX_PLATFORM_NAME", "")).strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None or importlib.metadata.entry_points(group="jax_plugins"):
        return False
    spec = importlib.util.find_spec("jax_plugins")
    return spec is None or not any(pkgutil.iter_modules(spec.submodule_search_locations or []))


@functools.cache
def jaxlib_knows(flag: str) -> bool:
    """Whether the installed jaxlib's XLA defines `flag`: its name is in one of jaxlib's shared libraries
    (~10 ms when present, a full scan of ~350 MB, ~0.5 s, only when absent; once per process). XLA
    aborts at backend start on a flag it does not know."""
    import importlib.util
    import mmap
    import pathlib

    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = flag.encode()
    for root in spec.submodule_search_locations:
        libs = [p for p in pathlib.Path(root).iterdir() if p.suffix in (".so", ".dylib", ".pyd", ".dll")]
        for lib in sorted(libs, key=lambda p: -p.stat().st_size):  # the big one holds XLA
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if data.find(needle) >= 0:
                    return True
    return False


def cpu_id() -> dict:
    """The CPU's model name with its family, model and stepping numbers (Zen 4 and Zen 5 share a name)."""
    out = {"cpu": platform.processor() or "", "cpu_family": None, "cpu_model": None, "cpu_stepping": None}
    names = {"model name": "cpu", "cpu family": "cpu_family", "model": "cpu_model", "stepping": "cpu_stepping"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in names and (out[names[key]] in (None, "") or key == "model name"):
                out[names[key]] = value if key == "model name" else int(value) if value.isdigit() else value
            if not line.strip():
                break  # the first processor is enough
    except OSError:
        pass
    return out


def environment(config) -> dict:
    """What a run's numbers rest on besides its config: the CPU (with family/model numbers), jax and jaxlib
    versions, XLA_FLAGS, whether glibc keeps freed memory (`runtime.cpu_defaults`), and the batch parts of
    the train step `lecture3.train` runs for `config` here (`steps.batch_splits`). Two runs with the same
    config and environment give the same final loss within 1e-4."""
    import jax
    import jaxlib

    from lecture3 import sharding, steps

    mesh = sharding.make_mesh(config.mesh)
    dev = jax.devices()[0]
    return {**cpu_id(), "platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "keep_host_memory": applied()["keep_host_memory"],
            "batch_splits": steps.batch_splits(config.model, config.train, mesh)}


# the fields of `environment` that must match for a rerun to be held to the same-environment tolerance
ENVIRONMENT_KEYS = ("cpu", "cpu_family", "cpu_model", "platform", "device_kind", "device_count", "jax", "jaxlib",
                    "xla_flags", "keep_host_memory", "batch_splits")


def environment_differences(recorded: dict | None, current: dict) -> list[str]:
    """`field: recorded -> now` for each environment field that differs (a record without one: all)."""
    if not recorded:
        return ["the record states no environment"]
    return [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in ENVIRONMENT_KEYS
            if recorded.get(k) != current.get(k)]
