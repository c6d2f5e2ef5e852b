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
from lecture3 import sharding as S
from lecture3 import train as T
from lecture3.checkpoint import Checkpointer, CheckpointError, check_resumable, write_json_atomic, write_text_atomic
from lecture3.config import Config
from lecture3.errors import Lecture3Error

log = logging.getLogger("lecture3")


class TrainingError(Lecture3Error, RuntimeError):
    """The run itself failed (e.g. a non-finite loss); the last good checkpoint is intact."""


# dense peak FLOP/s per chip for MFU (bf16 on accelerators); CPUs are measured instead
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0, "v100": 125.0,
               "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v6": 918.0}


def peak_flops_per_device(configured_tflops: float | None) -> float:
    if configured_tflops is not None:
        return configured_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    # CPU (or unknown): measure a float32 matmul of the kind the model does
    n = 512
    x = jnp.ones((n, n), jnp.float32)
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


def _truncate_metrics(path: Path, last_step: int) -> None:
    """After a resume, drop the entries a killed run wrote past the checkpoint it is resumed from
    (and a last line that a kill cut in half)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _local_rows(batch: dict, process_index: int, process_count: int) -> dict:
    n = len(next(iter(batch.values()))) // process_count
    return {k: v[process_index * n:(process_index + 1) * n] for k, v in batch.items()}


def check_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"workdir {workdir} cannot be written ({e.strerror}); choose another --workdir") from None


def run(cfg: Config, workdir: str | os.PathLike, *, loss_fn=None, echo=print) -> dict:
    """Train (or resume) in `workdir`; returns the final metrics. Same command again = exact resume."""
    from lecture3 import accounting

    workdir = Path(workdir)
    check_workdir(workdir)
    init_distributed(cfg)
    pi, pc = jax.process_index(), jax.process_count()
    mcfg, tcfg = cfg.model, cfg.train
    tokenizer = D.load_tokenizer(cfg.data, progress=tcfg.progress and pi == 0)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise D.DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{mcfg.vocab_size}; set --model.vocab-size {tokenizer.vocab_size}")
    check_resumable(workdir, cfg.to_dict())

    mesh = S.make_mesh(cfg.mesh)
    S.check_batch(mesh, tcfg.batch_size)
    rules = S.axis_rules(mcfg, mesh, tcfg.batch_size)
    optimizer = T.make_optimizer(tcfg)
    abstract, shardings = T.state_shardings(mcfg, tcfg, mesh, rules, optimizer)
    step_fn = T.jit_train_step(T.make_train_step(mcfg, tcfg, loss_fn, optimizer), mesh, rules, shardings)
    eval_fn = T.jit_eval_step(T.make_eval_step(mcfg), mesh, rules, shardings.params)
    data_sharding = S.batch_sharding(mesh, rules)

    iterator = D.make_train_iterator(cfg.data, tcfg.batch_size, process_index=pi, process_count=pc)
    val = D.validation_batches(cfg.data, tcfg.batch_size)[: tcfg.eval_batches]
    ckpt = Checkpointer(workdir, tcfg.keep_checkpoints)
    restored = ckpt.restore_latest(abstract, iterator)
    if restored is None:
        state, start = T.init_state(mcfg, tcfg, mesh, rules, optimizer, shardings), 0
    else:
        state, start = restored
        echo(f"resuming from step {start} in {workdir}")
    if pi == 0:
        write_json_atomic(workdir / "config.json", cfg.to_dict())
        _truncate_metrics(workdir / "metrics.jsonl", start)

    flops_per_token = accounting.flops_per_token(mcfg, cfg.data.seq_len)["training"]
    peak = peak_flops_per_device(tcfg.peak_tflops) * jax.device_count()
    tokens_per_step = tcfg.batch_size * cfg.data.seq_len

    def evaluate(params) -> dict:
        sums = [eval_fn(params, D.global_batch(_local_rows(b, pi, pc), data_sharding)) for b in val]
        loss = float(sum(s["loss_sum"] for s in sums) / sum(s["tokens"] for s in sums))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    writer, metrics_file, bar = None, None, None
    if pi == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tb"))
        metrics_file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        if tcfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=tcfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    record: dict = {}
    t_last, tokens_since = time.perf_counter(), 0
    try:
        for step in range(start, tcfg.steps):
            batch = D.global_batch(next(iterator), data_sharding)
            state, metrics = step_fn(state, batch)
            tokens_since += tokens_per_step
            done = step + 1
            finite = bool(metrics["finite"])
            if not finite and tcfg.on_nonfinite == "stop":
                last = ckpt.manager.latest_step()
                raise TrainingError(
                    f"non-finite loss at step {done}; the state was not updated and the last good checkpoint "
                    f"({'none yet' if last is None else f'step {last}'}) is intact. Lower --train.lr, add "
                    f"--train.z-loss 1e-4, or pass --train.on-nonfinite skip")
            log_now = done % tcfg.log_every == 0 or done == tcfg.steps
            eval_now = done % tcfg.eval_every == 0 or done == tcfg.steps
            if log_now or eval_now:
                elapsed = time.perf_counter() - t_last
                record = {"step": done, **{k: float(v) for k, v in metrics.items()}}
                record["tokens_per_s"] = tokens_since / elapsed
                record["mfu"] = record["tokens_per_s"] * flops_per_token / peak
                if eval_now:
                    record.update(evaluate(state.params))
                t_last, tokens_since = time.perf_counter(), 0
                if pi == 0:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(k, v, done)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                        **({"val": f"{record['val_loss']:.3f}"} if eval_now else {}))
            if bar is not None:
                bar.update(1)
            if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
                ckpt.save(done, state, iterator)
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
    return {"state": state, "metrics": record, "tokenizer": tokenizer, "unigram_entropy": unigram_entropy(val)}


def unigram_entropy(batches: list[dict]) -> float:
    """Entropy (nats) of the validation tokens' own frequencies: the best loss any unigram model gets there."""
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    p = np.bincount(targets) / len(targets)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
