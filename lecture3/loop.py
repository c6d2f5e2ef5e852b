"""The training loop around the pure step: data, evaluation, metrics, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lecture3 import data as dataio
from lecture3 import diagnostics, sharding, steps
from lecture3.checkpoint import Checkpointer, CheckpointError, check_resumable, record_config, write_text_atomic
from lecture3.config import Config, ModelConfig
from lecture3.errors import Lecture3Error

log = logging.getLogger("lecture3")


class TrainingError(Lecture3Error, RuntimeError):
    """The run itself failed (e.g. a non-finite loss); the last good checkpoint is intact. `step` is the
    step that failed, when known."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


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
    sharding.check_batch(sharding.make_mesh(cfg.mesh), cfg.train.batch_size)


def _check_finite(finite, step: int, ckpt: Checkpointer | None) -> None:
    """With on_nonfinite="stop": raise if the step that returned `finite` was not finite (a host sync)."""
    if bool(finite):
        return
    if ckpt is None:
        raise TrainingError(f"non-finite loss at step {step}; the state was not updated. Lower the lr, add "
                            "z-loss (train.z_loss=1e-4), or set train.on_nonfinite='skip'", step=step)
    last = ckpt.manager.latest_step()
    raise TrainingError(
        f"non-finite loss at step {step}; the state was not updated and the last good checkpoint "
        f"({'none yet' if last is None else f'step {last}'}) is intact. Lower --train.lr, add "
        f"--train.z-loss 1e-4, or pass --train.on-nonfinite skip", step=step)


class History(list):
    """Every logged record of a run, in step order: a list of dicts (`{"step": 10, "loss": ...}`)."""

    def to_list(self) -> list[dict]:
        return [dict(r) for r in self]

    def column(self, key: str) -> list:
        """(step, value) pairs of one metric, for the records that have it."""
        return [(r["step"], r[key]) for r in self if key in r]

    def to_pandas(self):
        """A DataFrame, one row per record and `step` its first column (`df.plot(x="step", y="loss")`,
        `df.set_index("step")`); needs pandas: `pip install pandas`."""
        try:
            import pandas as pd
        except ModuleNotFoundError:
            raise Lecture3Error("History.to_pandas needs pandas: pip install pandas (or use to_list())") from None
        df = pd.DataFrame(self.to_list())
        return df[["step", *(c for c in df.columns if c != "step")]] if "step" in df.columns else df

    @property
    def df(self):
        return self.to_pandas()


@dataclasses.dataclass
class Run:
    """What `train` returns (and `load_run` reads back): the config, every logged record, the final state."""

    config: Config
    history: History
    state: Any = None  # the final TrainState (None from `load_run`, which reads the params only)
    params: Any = None  # the final params (plain arrays)
    workdir: Path | None = None
    tokenizer: Any = None  # the data's tokenizer when the run read `config.data`
    unigram_entropy: float | None = None  # of the validation tokens: the loss any unigram model reaches
    stopped: str | None = None  # why the run ended before `train.steps` (a callback), else None

    @property
    def metrics(self) -> dict:
        """The last logged record."""
        return dict(self.history[-1]) if self.history else {}


Batches = Iterable[Mapping[str, Any]]
Callback = Callable[[dict], Any]


def _check_batch(raw, i: int, what: str) -> Mapping[str, Any]:
    """`raw` itself if it is a batch (a mapping with `inputs` and `targets`), else a one-line DataError
    naming the argument (`what`) and the batch's index."""
    if not isinstance(raw, Mapping) or "inputs" not in raw or "targets" not in raw:
        raise dataio.DataError(f"{what} batch {i} is not a mapping with 'inputs' and 'targets' (int[B, T]); "
                               "optional keys: loss_mask, positions, segment_ids")
    return raw


def _user_batches(data: Batches, tcfg, seq_len: int, what: str):
    """The caller's batches as dicts of numpy arrays, checked against the config (before any compute)."""
    for i, raw in enumerate(data):
        batch = {k: np.asarray(v) for k, v in _check_batch(raw, i, what).items()}
        shape = (tcfg.batch_size, seq_len)
        if batch["inputs"].shape != shape or batch["targets"].shape != shape:
            raise dataio.DataError(f"{what} batch {i} has inputs {batch['inputs'].shape} and targets "
                                   f"{batch['targets'].shape}; the config asks for [train.batch_size, "
                                   f"data.seq_len] = {list(shape)}")
        batch.setdefault("loss_mask", np.ones(shape, np.float32))
        yield batch


def train(config: Config, *, data: Batches | None = None, workdir: str | os.PathLike | None = None,
          loss_fn=None, optimizer=None, callbacks: Sequence[Callback] = (), progress: bool | None = None,
          val_data: Batches | None = None, echo=print) -> Run:
    """Train `config` and return the `Run`: the same pure sharded step and loop as `lecture3 train`.

    data: None reads `config.data` (corpus, tokenizer, grain pipeline, its validation set); or any iterable
        of batches, dicts of numpy/jax arrays `inputs`, `targets` int[train.batch_size, data.seq_len] and
        optionally `loss_mask`, `positions`, `segment_ids` (then `val_data`, if given, is evaluated).
    workdir: None keeps everything in memory (no checkpoint, no file); a folder checkpoints, logs and
        resumes exactly as the CLI does (the same call again resumes; with your own `data` a resume skips
        the batches already used).
    loss_fn, optimizer: replace the config's loss terms / AdamW (see `steps.make_train_step`).
    callbacks: each is called with every logged record (a dict); one that returns a true value stops the
        run there (`Run.stopped` says which).
    progress: the progress bar (None: `config.train.progress`).
    """
    from lecture3 import accounting, runtime
    from lecture3.meter import LossMeter

    tcfg0 = config.train
    if progress is not None and progress != tcfg0.progress:
        config = config.replace(**{"train.progress": bool(progress)})
    workdir = None if workdir is None else Path(workdir)
    cfg = config
    if workdir is not None:
        check_inputs(cfg, workdir)
    else:
        init_distributed(cfg)
        sharding.check_batch(sharding.make_mesh(cfg.mesh), cfg.train.batch_size)
    pi, pc = jax.process_index(), jax.process_count()
    mcfg, tcfg = cfg.model, cfg.train
    tokenizer, iterator, val = None, None, []
    if data is None:
        tokenizer = dataio.load_tokenizer(cfg.data, progress=tcfg.progress and pi == 0)
        if tokenizer.vocab_size > mcfg.vocab_size:
            raise dataio.DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                                   f"{mcfg.vocab_size}; set --model.vocab-size {tokenizer.vocab_size}")
    if workdir is not None:
        check_resumable(workdir, cfg.to_dict())
    if data is None:
        iterator = dataio.make_train_iterator(cfg.data, tcfg.batch_size, process_index=pi, process_count=pc)
        val = dataio.validation_batches(cfg.data, tcfg.batch_size)[: tcfg.eval_batches]
        batches = iterator
    else:
        batches = _user_batches(data, tcfg, cfg.data.seq_len, "data")
        first = next(batches, None)  # the first batch is checked here, before any compute
        if first is None:
            raise dataio.DataError("data holds no batch: pass an iterable of batches (or data=None for config.data)")
        batches = itertools.chain([first], batches)
        val = [] if val_data is None else list(_user_batches(val_data, tcfg, cfg.data.seq_len, "val_data"))
    if workdir is not None:
        check_workdir(workdir, pi)

    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.axis_rules(mcfg, mesh, tcfg.batch_size)
    optimizer = steps.make_optimizer(tcfg) if optimizer is None else optimizer
    abstract, shardings = steps.state_shardings(mcfg, tcfg, mesh, rules, optimizer)
    splits = steps.batch_splits(mcfg, tcfg, mesh)
    step_fn = steps.jit_train_step(steps.make_train_step(mcfg, tcfg, loss_fn, optimizer, splits), mesh, rules,
                                   shardings)
    eval_fn = steps.jit_eval_step(steps.make_eval_step(mcfg), mesh, rules, shardings.params)
    data_sharding = sharding.batch_sharding(mesh, rules)

    ckpt = Checkpointer(workdir, tcfg.keep_checkpoints) if workdir is not None else None
    restored = None if ckpt is None else ckpt.restore_latest(abstract, iterator)
    if restored is None:
        state, start = steps.init_state(mcfg, tcfg, mesh, rules, optimizer, shardings), 0
    else:
        state, start = restored
        echo(f"resuming from step {start} in {workdir}")
        if data is not None:  # the caller's batches carry no position: skip the ones already used
            for _ in range(start):
                next(batches, None)
    history = History()
    if pi == 0 and workdir is not None:
        record_config(workdir, cfg.to_dict(), start, runtime.environment(cfg))
        history.extend(_truncate_metrics(workdir / "metrics.jsonl", start))

    flops_per_token = accounting.flops_per_token(mcfg, cfg.data.seq_len)["training"]
    peak = peak_flops_per_device(tcfg.peak_tflops, mcfg.dtype)
    if peak is None and pi == 0:
        echo(f"note: no MFU: the peak FLOP/s of a {jax.devices()[0].device_kind!r} in {mcfg.dtype} is not "
             f"known; pass --train.peak-tflops N (its dense {mcfg.dtype} peak per device) to report it")
    tokens_per_step = tcfg.batch_size * cfg.data.seq_len

    def evaluate_state(params) -> dict:
        if not val:
            return {}
        sums = [eval_fn(params, dataio.global_batch(_local_rows(b, pi, pc), data_sharding)) for b in val]
        loss = float(sum(s["loss_sum"] for s in sums) / sum(s["tokens"] for s in sums))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    writer, metrics_file, bar = None, None, None
    if pi == 0:
        if workdir is not None:
            writer = _tensorboard(workdir / "tb", history)
            metrics_file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        if tcfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    stop = tcfg.on_nonfinite == "stop"
    stopped = None
    # tokens/s counts the steps between two log steps, without the first (compiling) step of this
    # process, evaluation, or checkpoint saves
    t_last, tokens_since = None, 0
    pending = None  # (finite flag, step) checked once the next step is queued, so loading overlaps compute
    done = start
    meter = LossMeter()  # the logged loss (and its terms): the mean over the steps since the last log
    try:
        for step in range(start, tcfg.steps):
            local = next(batches, None)
            if local is None:
                stopped = f"the data ran out after {step} steps"
                break
            batch = dataio.global_batch(_local_rows(local, pi, pc) if data is not None else local, data_sharding)
            state, metrics = step_fn(state, batch)
            meter.add(metrics)
            done = step + 1
            if pending is not None:
                _check_finite(*pending, ckpt)
                pending = None
            if stop:
                pending = (metrics["finite"], done)
            log_now = done % tcfg.log_every == 0 or done == tcfg.steps
            eval_now = done % tcfg.eval_every == 0 or done == tcfg.steps
            save_now = ckpt is not None and (done % tcfg.checkpoint_every == 0 or done == tcfg.steps)
            if pending is not None and (t_last is None or log_now or eval_now or save_now or callbacks):
                _check_finite(*pending, ckpt)  # this step is needed now anyway: nothing is logged or saved past it
                pending = None
            if t_last is None:
                jax.block_until_ready(metrics)
                t_last = time.perf_counter()
            else:
                tokens_since += tokens_per_step
            if log_now or eval_now:
                values = meter.take(jax.device_get(metrics))
                elapsed = time.perf_counter() - t_last
                record = {"step": done, **{k: float(v) for k, v in diagnostics.flatten_layers(values).items()}}
                record["tokens_per_s"] = tokens_since / elapsed if tokens_since else None
                record["mfu"] = (record["tokens_per_s"] * flops_per_token / (peak * jax.device_count())
                                 if tokens_since and peak is not None else None)
                if eval_now:
                    record.update(evaluate_state(state.params))
                for callback in callbacks:
                    if callback(dict(record)) and not stopped:
                        stopped = f"stopped by {getattr(callback, '__name__', repr(callback))} at step {done}"
                if stopped and not eval_now:  # a run a callback stops ends evaluated, like any other
                    record.update(evaluate_state(state.params))
                history.append(record)
                if pi == 0:
                    if metrics_file is not None:
                        metrics_file.write(_json_line(record))
                        metrics_file.flush()
                        _add_scalars(writer, record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", **(
                            {"tok_s": f"{record['tokens_per_s']:.0f}"} if tokens_since else {}),
                            **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
                t_last, tokens_since = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if save_now or (stopped and ckpt is not None):
                t_save = time.perf_counter()
                ckpt.save(done, state, iterator)
                t_last += time.perf_counter() - t_save
            if stopped:
                break
        if pending is not None:
            _check_finite(*pending, ckpt)
    finally:
        if ckpt is not None:
            ckpt.wait()
        if pi == 0:
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
                writer.close()
    if start >= tcfg.steps:
        echo(f"{workdir} already holds step {start} of {tcfg.steps}; nothing to train")
        history.append({"step": start, **evaluate_state(state.params)})
    if pi == 0 and workdir is not None:
        echo(f"wrote {workdir}/: metrics.jsonl, tb/ (tensorboard --logdir {workdir / 'tb'}), checkpoints/ "
             f"(latest step {ckpt.manager.latest_step()}), config.json and config-history.jsonl")
    return Run(config=cfg, history=history, state=state, params=state.params, workdir=workdir,
               tokenizer=tokenizer, unigram_entropy=unigram_entropy(val) if val else None, stopped=stopped)


def run(cfg: Config, workdir: str | os.PathLike, *, loss_fn=None, echo=print) -> dict:
    """`train` in `workdir`, as a dict (state, the last record as metrics, tokenizer, unigram entropy)."""
    out = train(cfg, workdir=workdir, loss_fn=loss_fn, echo=echo)
    return {"state": out.state, "metrics": out.metrics, "tokenizer": out.tokenizer,
            "unigram_entropy": out.unigram_entropy}


def init_params(cfg: Config | ModelConfig, rng: int | jax.Array = 0):
    """Fresh params of the model (plain arrays, no partitioning boxes); `rng` a seed or a key."""
    from lecture3.model import Transformer

    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    tokens = jnp.zeros((1, min(8, mcfg.max_seq_len)), jnp.int32)
    return nn.unbox(Transformer(mcfg).init({"params": key}, tokens)["params"])


def evaluate(cfg: Config | ModelConfig, params, data: Batches) -> dict:
    """{"loss", "perplexity", "tokens"}: the token-weighted mean cross-entropy (nats) of `params` over `data`,
    an iterable of batches (`inputs`, `targets`, optionally `loss_mask`, `positions`, `segment_ids`), on
    one device."""
    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    eval_fn = _jitted_eval(mcfg)
    loss_sum, tokens = 0.0, 0.0
    for i, raw in enumerate(data):
        out = eval_fn(params, {k: jnp.asarray(v) for k, v in _check_batch(raw, i, "evaluate: data").items()})
        loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
    if tokens == 0:
        raise dataio.DataError("evaluate: the data held no target token (empty, or every loss_mask is 0)")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}


@functools.cache
def _jitted_eval(mcfg: ModelConfig):
    return jax.jit(steps.make_eval_step(mcfg))


def load_run(workdir: str | os.PathLike) -> Run:
    """A finished (or interrupted) run read back: its config, its metrics history and its latest params."""
    from lecture3.checkpoint import load_config, load_for_inference

    workdir = Path(workdir)
    cfg = load_config(workdir)
    history = History()
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a last line that a kill cut in half
    _, params, tokenizer = load_for_inference(workdir)
    return Run(config=cfg, history=history, params=params, workdir=workdir, tokenizer=tokenizer)


def unigram_entropy(batches: list[dict]) -> float:
    """Entropy (nats) of the validation tokens' own frequencies: the best loss any unigram model gets there."""
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    p = np.bincount(targets) / len(targets)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
