"""The training loop around the pure step: data, evaluation, metrics, checkpoints and exact resume."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lecture3 import data as D
from lecture3 import diagnostics
from lecture3 import sharding as S
from lecture3 import train as T
from lecture3.checkpoint import Checkpointer, CheckpointError, check_resumable, record_config, write_text_atomic
from lecture3.config import Config
from lecture3.errors import Lecture3Error

log = logging.getLogger("lecture3")


class TrainingError(Lecture3Error, RuntimeError):
    """The run itself failed (e.g. a non-finite loss); the last good checkpoint is intact."""


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


def init_distributed(cfg: Config) -> None:
    """jax.distributed from explicit flags, or auto-detected on a TPU pod / SLURM job."""
    d = cfg.dist
    if jax.distributed.is_initialized():
        return
    # CPU processes need a collectives backend to talk to each other; accelerators ignore this
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if d.coordinator_address is not None:
        jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
        jax.distributed.initialize()


def _truncate_metrics(path: Path, last_step: int) -> list[dict]:
    """After a resume, drop the entries a killed run wrote past the checkpoint it is resumed from
    (and a last line that a kill cut in half); returns the records kept."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if record["step"] <= last_step:
                kept.append(record)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(_json_line(r) for r in kept))
    return kept


def _json_line(record: dict) -> str:
    """One strict-JSON line: a NaN or infinite value is written as null, never as bare NaN/Infinity."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def _add_scalars(writer, record: dict) -> None:
    for k, v in record.items():
        if k != "step" and v is not None and math.isfinite(v):
            writer.add_scalar(k, v, record["step"])


def _tensorboard(tb_dir: Path, kept: list[dict]):
    """A fresh events file holding exactly the kept metrics.jsonl records: the events of earlier runs
    (which may go past the checkpoint this run resumes from) are deleted, as their metrics lines are."""
    from tensorboardX import SummaryWriter

    if tb_dir.is_dir():
        for old in tb_dir.glob("events.out.tfevents.*"):
            old.unlink()
    writer = SummaryWriter(str(tb_dir))
    for record in kept:
        _add_scalars(writer, record)
    return writer


def _local_rows(batch: dict, process_index: int, process_count: int) -> dict:
    n = len(next(iter(batch.values()))) // process_count
    return {k: v[process_index * n:(process_index + 1) * n] for k, v in batch.items()}


def _check_workdir_path(workdir: Path) -> None:
    for path in (workdir, *workdir.parents):
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(f"workdir {workdir} cannot be written: {path} is a file, not a folder; "
                                      f"choose another --workdir")
            return


def check_workdir(workdir: Path, process_index: int = 0) -> None:
    """Create `workdir` and prove it writable; each process probes with its own file (shared storage)."""
    _check_workdir_path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{process_index}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"workdir {workdir} cannot be written ({e.strerror}); choose another --workdir") from None


def check_inputs(cfg: Config, workdir: str | os.PathLike) -> None:
    """The errors a run can know before it creates or prints anything: a workdir that cannot be one, a
    data source that matches nothing, a mesh that does not fit the devices or the batch."""
    from lecture3.data import sources

    _check_workdir_path(Path(workdir))
    kind, pattern, _ = sources.parse_source(cfg.data.source)
    if kind == "files":
        sources.glob_files(pattern)
    init_distributed(cfg)
    S.check_batch(S.make_mesh(cfg.mesh), cfg.train.batch_size)


def _check_finite(finite, step: int, ckpt: Checkpointer) -> None:
    """With on_nonfinite="stop": raise if the step that returned `finite` was not finite (a host sync)."""
    if bool(finite):
        return
    last = ckpt.manager.latest_step()
    raise TrainingError(
        f"non-finite loss at step {step}; the state was not updated and the last good checkpoint "
        f"({'none yet' if last is None else f'step {last}'}) is intact. Lower --train.lr, add "
        f"--train.z-loss 1e-4, or pass --train.on-nonfinite skip")


def run(cfg: Config, workdir: str | os.PathLike, *, loss_fn=None, echo=print) -> dict:
    """Train (or resume) in `workdir`; returns the final metrics. Same command again = exact resume.

    Everything that can be wrong with the inputs is checked before the workdir is created."""
    from lecture3 import accounting

    workdir = Path(workdir)
    check_inputs(cfg, workdir)
    pi, pc = jax.process_index(), jax.process_count()
    mcfg, tcfg = cfg.model, cfg.train
    tokenizer = D.load_tokenizer(cfg.data, progress=tcfg.progress and pi == 0)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise D.DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{mcfg.vocab_size}; set --model.vocab-size {tokenizer.vocab_size}")
    check_resumable(workdir, cfg.to_dict())
    iterator = D.make_train_iterator(cfg.data, tcfg.batch_size, process_index=pi, process_count=pc)
    val = D.validation_batches(cfg.data, tcfg.batch_size)[: tcfg.eval_batches]
    check_workdir(workdir, pi)

    mesh = S.make_mesh(cfg.mesh)
    rules = S.axis_rules(mcfg, mesh, tcfg.batch_size)
    optimizer = T.make_optimizer(tcfg)
    abstract, shardings = T.state_shardings(mcfg, tcfg, mesh, rules, optimizer)
    step_fn = T.jit_train_step(T.make_train_step(mcfg, tcfg, loss_fn, optimizer), mesh, rules, shardings)
    eval_fn = T.jit_eval_step(T.make_eval_step(mcfg), mesh, rules, shardings.params)
    data_sharding = S.batch_sharding(mesh, rules)

    ckpt = Checkpointer(workdir, tcfg.keep_checkpoints)
    restored = ckpt.restore_latest(abstract, iterator)
    if restored is None:
        state, start = T.init_state(mcfg, tcfg, mesh, rules, optimizer, shardings), 0
    else:
        state, start = restored
        echo(f"resuming from step {start} in {workdir}")
    kept = []
    if pi == 0:
        record_config(workdir, cfg.to_dict(), start)
        kept = _truncate_metrics(workdir / "metrics.jsonl", start)

    flops_per_token = accounting.flops_per_token(mcfg, cfg.data.seq_len)["training"]
    peak = peak_flops_per_device(tcfg.peak_tflops, mcfg.dtype)
    if peak is None and pi == 0:
        echo(f"note: no MFU: the peak FLOP/s of a {jax.devices()[0].device_kind!r} in {mcfg.dtype} is not "
             f"known; pass --train.peak-tflops N (its dense {mcfg.dtype} peak per device) to report it")
    tokens_per_step = tcfg.batch_size * cfg.data.seq_len

    def evaluate(params) -> dict:
        sums = [eval_fn(params, D.global_batch(_local_rows(b, pi, pc), data_sharding)) for b in val]
        loss = float(sum(s["loss_sum"] for s in sums) / sum(s["tokens"] for s in sums))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    writer, metrics_file, bar = None, None, None
    if pi == 0:
        writer = _tensorboard(workdir / "tb", kept)
        metrics_file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        if tcfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    stop = tcfg.on_nonfinite == "stop"
    record: dict = {}
    # tokens/s counts the steps between two log steps, without the first (compiling) step of this
    # process, evaluation, or checkpoint saves
    t_last, tokens_since = None, 0
    pending = None  # (finite flag, step) checked once the next step is queued, so loading overlaps compute
    try:
        for step in range(start, tcfg.steps):
            batch = D.global_batch(next(iterator), data_sharding)
            state, metrics = step_fn(state, batch)
            done = step + 1
            if pending is not None:
                _check_finite(*pending, ckpt)
                pending = None
            if stop:
                pending = (metrics["finite"], done)
            log_now = done % tcfg.log_every == 0 or done == tcfg.steps
            eval_now = done % tcfg.eval_every == 0 or done == tcfg.steps
            save_now = done % tcfg.checkpoint_every == 0 or done == tcfg.steps
            if pending is not None and (t_last is None or log_now or eval_now or save_now):
                _check_finite(*pending, ckpt)  # this step is needed now anyway: nothing is logged or saved past it
                pending = None
            if t_last is None:
                jax.block_until_ready(metrics)
                t_last = time.perf_counter()
            else:
                tokens_since += tokens_per_step
            if log_now or eval_now:
                values = jax.device_get(metrics)
                elapsed = time.perf_counter() - t_last
                record = {"step": done, **{k: float(v) for k, v in diagnostics.flatten_layers(values).items()}}
                record["tokens_per_s"] = tokens_since / elapsed if tokens_since else None
                record["mfu"] = (record["tokens_per_s"] * flops_per_token / (peak * jax.device_count())
                                 if tokens_since and peak is not None else None)
                if eval_now:
                    record.update(evaluate(state.params))
                if pi == 0:
                    metrics_file.write(_json_line(record))
                    metrics_file.flush()
                    _add_scalars(writer, record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", **(
                            {"tok_s": f"{record['tokens_per_s']:.0f}"} if tokens_since else {}),
                            **({"val": f"{record['val_loss']:.3f}"} if eval_now else {}))
                t_last, tokens_since = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if save_now:
                t_save = time.perf_counter()
                ckpt.save(done, state, iterator)
                t_last += time.perf_counter() - t_save
        if pending is not None:
            _check_finite(*pending, ckpt)
    finally:
        ckpt.wait()
        if pi == 0:
            if bar is not None:
                bar.close()
            metrics_file.close()
            writer.close()
    if start >= tcfg.steps:
        echo(f"{workdir} already holds step {start} of {tcfg.steps}; nothing to train")
        record = {"step": start, **evaluate(state.params)}
    if pi == 0:
        echo(f"wrote {workdir}/: metrics.jsonl, tb/ (tensorboard --logdir {workdir / 'tb'}), checkpoints/ "
             f"(latest step {ckpt.manager.latest_step()}), config.json and config-history.jsonl")
    return {"state": state, "metrics": record, "tokenizer": tokenizer, "unigram_entropy": unigram_entropy(val)}


def unigram_entropy(batches: list[dict]) -> float:
    """Entropy (nats) of the validation tokens' own frequencies: the best loss any unigram model gets there."""
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    p = np.bincount(targets) / len(targets)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
