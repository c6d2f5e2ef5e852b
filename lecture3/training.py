"""The pieces every training loop uses (`lecture3.train` and `lecture3.population.train`): the run's data and
validation set, the log/eval/save cadence, the log record, the validation loss and the progress bar.

The loops differ in their state (one model, or a member axis) and in what they write; what a record holds,
when it is written and how the validation loss is averaged is said here once.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from lecture3 import data as dataio
from lecture3 import diagnostics, meter
from lecture3.config import Config, TrainConfig

Batches = Iterable[Mapping[str, Any]]


def check_batch(raw, i: int, what: str) -> Mapping[str, Any]:
    """`raw` itself if it is a batch (a mapping with `inputs` and `targets`), else a one-line DataError
    naming the argument (`what`) and the batch's index."""
    if not isinstance(raw, Mapping) or "inputs" not in raw or "targets" not in raw:
        raise dataio.DataError(f"{what} batch {i} is not a mapping with 'inputs' and 'targets' (int[B, T]); "
                               "optional keys: loss_mask, positions, segment_ids")
    return raw


def user_batches(data: Batches, tcfg: TrainConfig, seq_len: int, what: str) -> Iterator[dict]:
    """The caller's batches as dicts of numpy arrays, checked against the config (before any compute)."""
    for i, raw in enumerate(data):
        batch = {k: np.asarray(v) for k, v in check_batch(raw, i, what).items()}
        shape = (tcfg.batch_size, seq_len)
        if batch["inputs"].shape != shape or batch["targets"].shape != shape:
            raise dataio.DataError(f"{what} batch {i} has inputs {batch['inputs'].shape} and targets "
                                   f"{batch['targets'].shape}; the config asks for [train.batch_size, "
                                   f"data.seq_len] = {list(shape)}")
        batch.setdefault("loss_mask", np.ones(shape, np.float32))
        yield batch


def user_data(cfg: Config, data: Batches, val_data: Batches | None) -> tuple[Iterator[dict], list[dict]]:
    """(training batches, validation batches) from the caller's iterables; the first training batch is read
    and checked here, before any compute."""
    tcfg, seq_len = cfg.train, cfg.data.seq_len
    batches = user_batches(data, tcfg, seq_len, "data")
    first = next(batches, None)
    if first is None:
        raise dataio.DataError("data holds no batch: pass an iterable of batches (or data=None for config.data)")
    val = [] if val_data is None else list(user_batches(val_data, tcfg, seq_len, "val_data"))
    return itertools.chain([first], batches), val


def load_tokenizer(cfg: Config, show_progress: bool):
    """The data's tokenizer, refused when it has more tokens than the model's vocabulary."""
    tokenizer = dataio.load_tokenizer(cfg.data, progress=show_progress)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise dataio.DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                               f"{cfg.model.vocab_size}; set model.vocab_size to {tokenizer.vocab_size} "
                               f"(--model.vocab-size {tokenizer.vocab_size})")
    return tokenizer


def validation_set(cfg: Config) -> list[dict]:
    """The fixed validation batches of `cfg.data`, at most `train.eval_batches` of them."""
    return dataio.validation_batches(cfg.data, cfg.train.batch_size)[: cfg.train.eval_batches]


@dataclasses.dataclass(frozen=True)
class Due:
    """What a step ends with: a log record, an evaluation, a checkpoint."""

    log: bool
    eval: bool
    save: bool = False


def due(tcfg: TrainConfig, done: int, checkpoints: bool = False) -> Due:
    """After `done` steps: log every `log_every`, evaluate every `eval_every`, save every `checkpoint_every`
    (with checkpoints), and all three at the last step."""
    last = done == tcfg.steps
    return Due(log=done % tcfg.log_every == 0 or last, eval=done % tcfg.eval_every == 0 or last,
               save=checkpoints and (done % tcfg.checkpoint_every == 0 or last))


def clock(cfg: Config, devices: int, echo, members: int = 1) -> meter.Throughput:
    """The run's tokens/s and MFU clock; says once (process 0) why there is no MFU when the device's peak is
    unknown, and how to give it."""
    throughput = meter.Throughput.for_run(cfg, devices, members)
    if throughput.peak is None and jax.process_index() == 0:
        dtype = cfg.model.dtype
        echo(f"note: no MFU: the peak FLOP/s of a {jax.devices()[0].device_kind!r} in {dtype} is not "
             f"known; pass --train.peak-tflops N (its dense {dtype} peak per device) to report it")
    return throughput


def log_record(done: int, values: Mapping[str, Any], rate: float | None, mfu: float | None) -> dict:
    """One log record: the step, each metric as a float (per-layer arrays as `name/i`), tokens/s and MFU."""
    record = {"step": done, **{k: float(v) for k, v in diagnostics.flatten_layers(dict(values)).items()}}
    record["tokens_per_s"], record["mfu"] = rate, mfu
    return record


def mean_loss(sums: list[dict]):
    """The token-weighted mean of an evaluation's per-batch {"loss_sum", "tokens"} (arrays: per member)."""
    return sum(s["loss_sum"] for s in sums) / sum(s["tokens"] for s in sums)


def val_record(loss: float) -> dict:
    """The validation loss (nats/token) and its perplexity; NaN stays NaN."""
    return {"val_loss": loss, "val_ppl": math.nan if math.isnan(loss) else math.exp(min(loss, 50.0))}


def progress_bar(tcfg: TrainConfig, desc: str, initial: int = 0):
    """A tqdm bar over the run's steps when `train.progress`, else None."""
    if not tcfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=tcfg.steps, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def unigram_entropy(batches: list[dict]) -> float:
    """Entropy (nats) of the validation tokens' own frequencies: the best loss any unigram model gets there."""
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    p = np.bincount(targets) / len(targets)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
