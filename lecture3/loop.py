"""The training loop around the pure step: data, evaluation, metrics, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lecture3 import data as dataio
from lecture3 import meter, sharding, steps, training
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


def init_distributed(cfg: Config) -> None:
    """jax.distributed from explicit flags, or auto-detected on a TPU pod / SLURM job."""
    d = cfg.dist
    detected = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")
    if jax.distributed.is_initialized() or (d.coordinator_address is None and not detected):
        return  # one process: nothing to join, and none of the process's jax settings is touched
    # CPU processes need a collectives backend to talk to each other; accelerators ignore this
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if d.coordinator_address is not None:
        jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)
    else:
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


class _FiniteGuard:
    """With on_nonfinite="stop": a step's `finite` flag is read (a host sync) once the next step is queued, so
    loading overlaps compute, or at once when the step is needed now (it is logged, saved, or the first)."""

    def __init__(self, on: bool, ckpt: Checkpointer | None):
        self.on, self.ckpt, self.pending = on, ckpt, None

    def after_step(self, finite, done: int, needed: bool) -> None:
        self.flush()
        if self.on:
            self.pending = (finite, done)
        if needed:
            self.flush()

    def flush(self) -> None:
        if self.pending is not None:
            finite, step = self.pending
            self.pending = None
            if not bool(finite):
                raise _nonfinite_error(step, self.ckpt)


def _nonfinite_error(step: int, ckpt: Checkpointer | None) -> TrainingError:
    if ckpt is None:
        return TrainingError(f"non-finite loss at step {step}; the state was not updated. Lower the lr, add "
                             "z-loss (train.z_loss=1e-4), or set train.on_nonfinite='skip'", step=step)
    last = ckpt.manager.latest_step()
    return TrainingError(
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


Batches = training.Batches
Callback = Callable[[dict], Any]


@dataclasses.dataclass
class _Source:
    """A run's data: the batches this process trains on, the validation set, the tokenizer and the grain
    iterator a checkpoint saves (None for the caller's own batches, which carry no position)."""

    batches: Iterator[dict]
    val: list[dict]
    tokenizer: Any = None
    iterator: Any = None

    @property
    def user(self) -> bool:
        return self.iterator is None


def _open_source(cfg: Config, data: Batches | None, val_data: Batches | None, workdir: Path | None) -> _Source:
    """Every check a run can make before it computes or writes anything, then its data."""
    if workdir is not None:
        check_inputs(cfg, workdir)
    else:
        init_distributed(cfg)
        sharding.check_batch(sharding.make_mesh(cfg.mesh), cfg.train.batch_size)
    pi, pc = jax.process_index(), jax.process_count()
    tokenizer = None if data is not None else training.load_tokenizer(cfg, cfg.train.progress and pi == 0)
    if workdir is not None:
        check_resumable(workdir, cfg.to_dict())
    if data is None:
        iterator = dataio.make_train_iterator(cfg.data, cfg.train.batch_size, process_index=pi, process_count=pc)
        source = _Source(iterator, training.validation_set(cfg), tokenizer, iterator)
    else:
        source = _Source(*training.user_data(cfg, data, val_data))
    if workdir is not None:
        check_workdir(workdir, pi)
    return source


@dataclasses.dataclass
class _Program:
    """The jitted train and eval steps of a config on its mesh, and how a batch reaches the mesh."""

    step: Callable
    eval: Callable
    abstract: Any
    shardings: Any
    optimizer: Any
    data_sharding: Any
    mesh: Any
    rules: Any

    @classmethod
    def build(cls, cfg: Config, loss_fn, optimizer) -> _Program:
        mcfg, tcfg = cfg.model, cfg.train
        mesh = sharding.make_mesh(cfg.mesh)
        rules = sharding.axis_rules(mcfg, mesh, tcfg.batch_size)
        optimizer = steps.make_optimizer(tcfg) if optimizer is None else optimizer
        abstract, shardings = steps.state_shardings(mcfg, tcfg, mesh, rules, optimizer)
        step = steps.make_train_step(mcfg, tcfg, loss_fn, optimizer, steps.batch_splits(mcfg, tcfg, mesh))
        return cls(step=steps.jit_train_step(step, mesh, rules, shardings),
                   eval=steps.jit_eval_step(steps.make_eval_step(mcfg), mesh, rules, shardings.params),
                   abstract=abstract, shardings=shardings, optimizer=optimizer,
                   data_sharding=sharding.batch_sharding(mesh, rules), mesh=mesh, rules=rules)

    def put(self, batch: dict, whole: bool) -> dict:
        """A batch as global arrays on the mesh: this process's rows of a `whole` (global) batch, or the
        process's own rows as they are (the pipeline's batches)."""
        pi, pc = jax.process_index(), jax.process_count()
        return dataio.global_batch(_local_rows(batch, pi, pc) if whole else batch, self.data_sharding)

    def evaluate(self, val: list[dict], params) -> dict:
        """The validation record of `params` ({} without a validation set)."""
        if not val:
            return {}
        return training.val_record(float(training.mean_loss([self.eval(params, self.put(b, True)) for b in val])))


def _initial_state(cfg: Config, program: _Program, ckpt: Checkpointer | None, source: _Source, echo,
                   workdir: Path | None):
    """(state, first step): the latest checkpoint's, else a fresh init; the caller's batches already used
    are skipped."""
    restored = None if ckpt is None else ckpt.restore_latest(program.abstract, source.iterator)
    if restored is None:
        return steps.init_state(cfg.model, cfg.train, program.mesh, program.rules, program.optimizer,
                                program.shardings), 0
    state, start = restored
    echo(f"resuming from step {start} in {workdir}")
    if source.user:
        for _ in range(start):
            next(source.batches, None)
    return state, start


class _Sinks:
    """Where process 0 writes the records: metrics.jsonl and TensorBoard (with a workdir) and the progress bar."""

    def __init__(self, cfg: Config, workdir: Path | None, history: History, start: int):
        self.writer = self.file = self.bar = None
        if jax.process_index() != 0:
            return
        if workdir is not None:
            self.writer = _tensorboard(workdir / "tb", history)
            self.file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        self.bar = training.progress_bar(cfg.train, "train", start)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(_json_line(record))
            self.file.flush()
            _add_scalars(self.writer, record)
        if self.bar is not None:
            shown = {"tok_s": f"{record['tokens_per_s']:.0f}"} if record["tokens_per_s"] else {}
            shown.update({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {})
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", **shown)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
            self.writer.close()


def _history(cfg: Config, workdir: Path | None, start: int) -> History:
    """The records a resumed run keeps (process 0 with a workdir; config.json and its history written)."""
    from lecture3 import runtime

    history = History()
    if jax.process_index() == 0 and workdir is not None:
        record_config(workdir, cfg.to_dict(), start, runtime.environment(cfg))
        history.extend(_truncate_metrics(workdir / "metrics.jsonl", start))
    return history


def _ask(callbacks: Sequence[Callback], record: dict, done: int) -> str | None:
    """Each callback sees the record; why the first that returned a true value stops the run, else None."""
    stops = [c for c in callbacks if c(dict(record))]
    return f"stopped by {getattr(stops[0], '__name__', repr(stops[0]))} at step {done}" if stops else None


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
    if progress is not None and progress != config.train.progress:
        config = config.replace(**{"train.progress": bool(progress)})
    cfg, tcfg, workdir = config, config.train, None if workdir is None else Path(workdir)
    source = _open_source(cfg, data, val_data, workdir)
    program = _Program.build(cfg, loss_fn, optimizer)
    ckpt = Checkpointer(workdir, tcfg.keep_checkpoints) if workdir is not None else None
    state, start = _initial_state(cfg, program, ckpt, source, echo, workdir)
    history = _history(cfg, workdir, start)
    clock, loss_meter = training.clock(cfg, jax.device_count(), echo), meter.LossMeter()
    guard, sinks = _FiniteGuard(tcfg.on_nonfinite == "stop", ckpt), _Sinks(cfg, workdir, history, start)
    stopped, done = None, start
    try:
        for step in range(start, tcfg.steps):
            local = next(source.batches, None)
            if local is None:
                stopped = f"the data ran out after {step} steps"
                break
            state, metrics = program.step(state, program.put(local, source.user))
            loss_meter.add(metrics)
            done, now = step + 1, training.due(tcfg, step + 1, ckpt is not None)
            guard.after_step(metrics["finite"], done, not clock.started or now.log or now.eval or now.save
                             or bool(callbacks))
            clock.step(metrics)
            if now.log or now.eval:  # log (and evaluate)
                record = training.log_record(done, loss_meter.take(jax.device_get(metrics)), *clock.rates())
                if now.eval:
                    record.update(program.evaluate(source.val, state.params))
                stopped = _ask(callbacks, record, done)
                if stopped and not now.eval:  # a run a callback stops ends evaluated, like any other
                    record.update(program.evaluate(source.val, state.params))
                history.append(record)
                sinks.write(record)
                clock.restart()
            sinks.advance()
            if now.save or (stopped and ckpt is not None):  # save
                with clock.paused():
                    ckpt.save(done, state, source.iterator)
            if stopped:
                break
        guard.flush()
    finally:
        if ckpt is not None:
            ckpt.wait()
        sinks.close()
    if start >= tcfg.steps:
        echo(f"{workdir} already holds step {start} of {tcfg.steps}; nothing to train")
        history.append({"step": start, **program.evaluate(source.val, state.params)})
    if jax.process_index() == 0 and workdir is not None:
        echo(f"wrote {workdir}/: metrics.jsonl, tb/ (tensorboard --logdir {workdir / 'tb'}), checkpoints/ "
             f"(latest step {ckpt.manager.latest_step()}), config.json and config-history.jsonl")
    return Run(config=cfg, history=history, state=state, params=state.params, workdir=workdir,
               tokenizer=source.tokenizer, stopped=stopped,
               unigram_entropy=training.unigram_entropy(source.val) if source.val else None)


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
        out = eval_fn(params, {k: jnp.asarray(v) for k, v in training.check_batch(raw, i, "evaluate: data").items()})
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
