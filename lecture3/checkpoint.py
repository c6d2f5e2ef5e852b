"""Orbax checkpoints of the train state and the data iterator, with exact resume.

Layout of a workdir:
    config.json          the resolved config of the run (model, data, train, mesh): the latest command
    config-history.jsonl one line per start or resume: {"step": the step it started from, "config": ...}
    checkpoints/<step>/  state (params, optimiser state, step, rng) + data (grain iterator state)
    metrics.jsonl, tb/   metrics, one JSON object per logged step; TensorBoard events
A checkpoint that fails to restore is moved aside (never deleted) and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from lecture3.config import TrainConfig, fields_of_kind
from lecture3.errors import Lecture3Error
from lecture3.grid import config_diff

log = logging.getLogger("lecture3")


class CheckpointError(Lecture3Error):
    """A workdir that cannot be resumed as asked."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: a reader (or a kill) never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


# train fields that change what is logged, kept or sampled, never the updates or the order of the data
RESUME_SAFE_TRAIN_FIELDS = frozenset({
    "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "peak_tflops",
    "sample_tokens", "progress", "on_nonfinite", "allow_config_change", "log_per_layer",
    *fields_of_kind(TrainConfig, "implementation")})  # same maths however it is computed (train.loss_chunk)


def check_resumable(workdir: Path, config: dict) -> None:
    """Refuse to resume a workdir trained with a different model or data config, or with train fields
    that change the schedule, the optimiser or the data order (unless train.allow_config_change)."""
    path = workdir / "config.json"
    if not path.exists() or not any((workdir / "checkpoints").glob("[0-9]*")):
        return
    saved = json.loads(path.read_text())
    diffs = _diff_lines(saved, config, ("model", "data"))
    if diffs:
        raise CheckpointError(
            f"{workdir} holds a run with a different config ({diffs}); resume with the same "
            f"flags, or start a new run with another --workdir")
    diffs = _diff_lines(saved, config, ("train",), skip=RESUME_SAFE_TRAIN_FIELDS)
    if diffs and not config.get("train", {}).get("allow_config_change", False):
        raise CheckpointError(
            f"{workdir} was trained with other settings that change the schedule, the optimiser or the data "
            f"order ({diffs}); resume with the same flags, pass --train.allow-config-change true "
            f"to resume with these on purpose (config-history.jsonl keeps each command), or use another --workdir")


def _diff_lines(saved: dict, current: dict, sections: tuple[str, ...], skip: frozenset = frozenset()) -> str:
    """`section.field: old -> new` for each differing (nested) field of `sections`, sorted, joined by `; `."""
    def pick(config):
        return {s: {k: v for k, v in config.get(s, {}).items() if k not in skip} for s in sections}

    diff = config_diff(pick(saved), pick(current), nested=True)
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(diff.items()))


def record_config(workdir: Path, config: dict, step: int, environment: dict | None = None) -> None:
    """config.json becomes `config` (with the run's numerical `environment`, `runtime.environment`, under
    that key); config-history.jsonl gains a line saying which step it started from, in which environment."""
    env = {} if environment is None else {"environment": environment}
    write_json_atomic(workdir / "config.json", {**config, **env})
    with open(workdir / "config-history.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "config": config, **env}, sort_keys=True, default=str) + "\n")


def state_items(state) -> dict:
    """The top-level fields of a dataclass state as a dict of the very same objects (no copy: unlike
    `dataclasses.asdict`, which deep-copies every array into a new buffer)."""
    if not dataclasses.is_dataclass(state):
        return state
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


class Checkpointer:
    def __init__(self, workdir: Path, keep: int):
        self.dir = (workdir / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.dir, item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save(self, step: int, state, iterator=None) -> None:
        """Saves the state and the grain iterator, if any (each process writes its own iterator position;
        a run on the caller's own batches has none, and resumes by skipping the batches already used)."""
        items = {"state": ocp.args.StandardSave(state_items(state))}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state, iterator=None):
        """(state, step) from the newest readable checkpoint, or None when there is none; `iterator` (if
        given) is moved to the position saved with that state."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        target = state_items(abstract_state)
        for step in steps:
            try:
                items = {"state": ocp.args.StandardRestore(target)}
                if iterator is not None:
                    items["data"] = grain.checkpoint.CheckpointRestore(iterator)
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any failure to read means this checkpoint is unusable
                aside = self.dir / f"{step}.corrupt-{int(time.time())}"
                if jax.process_index() == 0:
                    os.replace(self.dir / str(step), aside)
                msg = (f"checkpoint {step} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                       f"moved it to {aside.name} and falling back to the previous one")
                log.warning(msg)
                print(f"warning: {msg}", flush=True)
                self.manager.reload()
                continue
            state = restored["state"]
            if dataclasses.is_dataclass(abstract_state):
                state = type(abstract_state)(**state)
            return state, step
        return None


def load_config(workdir: Path):
    """The resolved Config saved next to a run's checkpoints."""
    from lecture3.config import Config, DistConfig, MeshConfig, ModelConfig, TrainConfig
    from lecture3.data import DataConfig

    path = Path(workdir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{workdir} has no config.json: is it the --workdir of a `lecture3 train` run?")
    raw = json.loads(path.read_text())
    return Config(model=ModelConfig.from_dict(raw["model"]), data=DataConfig(**raw["data"]),
                  train=TrainConfig(**raw["train"]), mesh=MeshConfig(**raw["mesh"]), dist=DistConfig(**raw["dist"]))


def load_for_inference(workdir: str | os.PathLike):
    """(ModelConfig, params, tokenizer) from the newest readable checkpoint of a training run."""
    from lecture3 import sharding, steps
    from lecture3.config import MeshConfig
    from lecture3.data import load_tokenizer

    workdir = Path(workdir)
    cfg = load_config(workdir)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    rules = sharding.axis_rules(cfg.model, mesh, 1)
    abstract, _ = steps.state_shardings(cfg.model, cfg.train, mesh, rules)
    restored = Checkpointer(workdir, cfg.train.keep_checkpoints).restore_latest(abstract)  # params only
    if restored is None:
        raise CheckpointError(f"{workdir} has no checkpoint yet; train first (`lecture3 train --workdir {workdir}`)")
    return cfg.model, restored[0].params, load_tokenizer(cfg.data)
