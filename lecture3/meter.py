"""What every training loop measures: the logged loss (the mean over the steps since the last log) and the
throughput (tokens/s and MFU against the device's peak FLOP/s).

The step returns its loss and the loss's terms (cross-entropy, z-loss, ...) for that one batch: one batch
every `log_every` steps is a noisy curve (the quick start's jumped between 1.6 and 3.35). `LossMeter` adds
the loss and its terms up on the device as the steps run (no host sync) and a log record gets their mean.
The step's other metrics describe the state at one step (gradient norm, learning rate, the largest
attention logit, ...) and are logged as the last step's.
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp

# the step's metrics that describe one step rather than the loss: logged as the last step's values
STEP_SIGNALS = frozenset({"grad_norm", "update_ratio", "lr", "finite", "log_z_abs", "max_attn_logit"})


def is_loss_term(key: str) -> bool:
    """The loss and its terms (averaged since the last log); not a step signal or a per-layer array."""
    return key not in STEP_SIGNALS and not key.endswith("_layer")


class LossMeter:
    """Sums of the loss terms since the last `take` (arrays; a population's metrics have a member axis)."""

    def __init__(self):
        self.sums, self.count = None, 0

    def add(self, metrics: dict) -> None:
        terms = {k: v for k, v in metrics.items() if is_loss_term(k)}
        self.sums = terms if self.sums is None else jax.tree.map(jnp.add, self.sums, terms)
        self.count += 1

    def take(self, metrics: dict) -> dict:
        """`metrics` (this step's, on the host) with each loss term replaced by its mean since the last
        take; starts the next interval."""
        out = dict(metrics)
        if self.count:
            out.update({k: v / self.count for k, v in jax.device_get(self.sums).items()})
        self.sums, self.count = None, 0
        return out


def _gpu(bf16: float, tf32: float) -> dict[str, float]:
    return {"bfloat16": bf16, "float16": bf16, "float32": tf32}


def _tpu(bf16: float) -> dict[str, float]:
    return {"bfloat16": bf16, "float32": bf16}


# Dense (no sparsity) peak TFLOP/s per device, keyed by the exact `device_kind` jax reports, per compute
# dtype. GPU float32 matmuls run as TF32 at JAX's default precision, so float32 gets the TF32 peak; TPU
# float32 matmuls run as bf16 passes at the default precision, so it gets the bf16 peak. A dtype a
# device has no fast path for (bf16 on V100, f16 on TPU) is absent: no MFU rather than a wrong one.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": _gpu(989.0, 494.5), "NVIDIA H100 PCIe": _gpu(756.0, 378.0),
    "NVIDIA H100 NVL": _gpu(835.0, 417.5), "NVIDIA H200": _gpu(989.0, 494.5),
    "NVIDIA H200 NVL": _gpu(835.0, 417.5), "NVIDIA GH200 480GB": _gpu(989.0, 494.5),
    "NVIDIA A100-SXM4-40GB": _gpu(312.0, 156.0), "NVIDIA A100-SXM4-80GB": _gpu(312.0, 156.0),
    "NVIDIA A100-PCIE-40GB": _gpu(312.0, 156.0), "NVIDIA A100 80GB PCIe": _gpu(312.0, 156.0),
    "NVIDIA L40S": _gpu(362.0, 183.0), "NVIDIA L4": _gpu(121.0, 60.0), "NVIDIA A10": _gpu(125.0, 62.5),
    "Tesla V100-SXM2-16GB": {"float16": 125.0, "float32": 15.7},
    "Tesla V100-SXM2-32GB": {"float16": 125.0, "float32": 15.7},
    "TPU v4": _tpu(275.0), "TPU v5 lite": _tpu(197.0), "TPU v5e": _tpu(197.0), "TPU v5": _tpu(459.0),
    "TPU v5p": _tpu(459.0), "TPU v6 lite": _tpu(918.0), "TPU v6e": _tpu(918.0),
}


def _normal(kind: str) -> str:
    return " ".join(kind.lower().split())


def peak_flops_per_device(configured_tflops: float | None, dtype: str = "float32",
                          device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device in `dtype`: the configured value, the table's entry for this exact
    device kind, a timed matmul on a CPU, or None (unknown accelerator: no MFU, never a guess)."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    device = jax.devices()[0] if device is None else device
    table = {_normal(k): v for k, v in PEAK_TFLOPS.items()}
    tflops = table.get(_normal(device.device_kind), {}).get(dtype)
    if tflops is not None:
        return tflops * 1e12
    if device.platform != "cpu":
        return None  # a timed matmul on an accelerator measures the benchmark, not the chip
    # CPU: measure a matmul in the compute dtype, shared by the host's devices
    n = 512
    x = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        f(x).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / max(1, len(jax.local_devices()))


class Throughput:
    """tokens/s and MFU over the steps between two logs, without this process's first (compiling) step, and
    without what runs inside `paused()` (a checkpoint save) or after `rates()` until `restart()` (evaluation).
    `members` models train on each step's tokens (a population): MFU counts all of them."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None, devices: int,
                 members: int = 1):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.devices, self.members = devices, members
        self.t_last, self.tokens = None, 0

    @classmethod
    def for_run(cls, cfg, devices: int, members: int = 1) -> Throughput:
        """The clock of a run of `cfg` (a `Config`) on `devices`: its tokens per step, training FLOPs per token
        (`accounting`) and the device's peak (`peak_flops_per_device`)."""
        from lecture3 import accounting

        flops = accounting.flops_per_token(cfg.model, cfg.data.seq_len)["training"]
        peak = peak_flops_per_device(cfg.train.peak_tflops, cfg.model.dtype)
        return cls(cfg.train.batch_size * cfg.data.seq_len, flops, peak, devices, members)

    @property
    def started(self) -> bool:
        """Whether the first step of this process has been timed (its end starts the clock)."""
        return self.t_last is not None

    def step(self, metrics) -> None:
        """Count one step; the first waits for its result and starts the clock."""
        if self.t_last is None:
            jax.block_until_ready(metrics)
            self.t_last = time.perf_counter()
        else:
            self.tokens += self.tokens_per_step

    def rates(self) -> tuple[float | None, float | None]:
        """(tokens/s of one member, MFU of all) since the last restart; None before a step was counted."""
        elapsed = time.perf_counter() - self.t_last
        rate = self.tokens / elapsed if self.tokens else None
        mfu = (rate * self.members * self.flops_per_token / (self.peak * self.devices)
               if rate is not None and self.peak is not None else None)
        return rate, mfu

    def restart(self) -> None:
        self.t_last, self.tokens = time.perf_counter(), 0

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not counted."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t_last += time.perf_counter() - t0
