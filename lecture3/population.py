"""A population: P members that differ only in seed and scalar hyperparameters, trained as ONE jitted program.

    runs = population.train(cfg, [{"train.seed": s, "train.lr": lr} for s in (0, 1, 2) for lr in (1e-3, 3e-3)])
    [(r.overrides, r.val_loss, r.diverged_at) for r in runs]

Every leaf of the state has a leading member axis M; the step is `jax.vmap` of the same pure step that
`lecture3.train` jits (`steps.make_train_step`), so member i computes what its config trained alone computes
(a test holds it to 1e-5 over 20 steps). What differs between members is data, never program:

  train.lr, train.final_lr,      the schedule's numbers, in the optimizer state (`optax.inject_hyperparams`):
  train.warmup_steps,            computed in Python exactly as `optim.schedule` computes them, then read by
  train.weight_decay             a schedule of traced values (`schedule`) that repeats its float32 arithmetic
  train.z_loss                   a traced weight of the same z-loss term (0 for a member without one)
  train.seed                     the init key PRNGKey(seed) and the dropout key PRNGKey(seed + 1), as `init_state`
  data.seed                      the order of the batches: one data iterator per distinct data seed

Anything else (an architecture field, the batch, the steps, the schedule's kind) changes the program: such
configs are separate runs (or separate populations), and asking for it here is a `PopulationError`.

With the default `train.on_nonfinite="stop"` (where its solo run would stop with a TrainingError), a member
whose loss or gradient is non-finite is marked `diverged_at` that step, its state is frozen there and its
later metrics are NaN, while the others go on. With "skip" it skips that step and goes on, as its solo run
would: it is not marked (its records say `finite=0` for that step).

On several devices the member axis is sharded over a 1-D mesh ("member") of gcd(P, devices) devices; each
member's params are whole on its device (no fsdp/tensor axes inside a population).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lecture3 import data as dataio
from lecture3 import loop, losses, meter, optim, steps, training
from lecture3.config import Config, ConfigError, TrainConfig, dotted_keys
from lecture3.errors import Lecture3Error
from lecture3.model import Transformer

# the keys a member may override; every other key changes the compiled program
MEMBER_KEYS = ("train.seed", "data.seed", "train.lr", "train.final_lr", "train.warmup_steps",
               "train.weight_decay", "train.z_loss")
AXIS = "member"  # the mesh axis of the member dimension M


class PopulationError(Lecture3Error):
    """Members that cannot share one program, or a population the engine does not run."""


def member_configs(base: Config, members: Sequence[Mapping[str, Any]]) -> list[Config]:
    """Each member's full config (`base.replace(**overrides)`, validated), or a PopulationError naming the key
    a member may not change."""
    if not members:
        raise PopulationError("a population needs at least one member, e.g. [{'train.seed': 0}]")
    known = set(dotted_keys(base))
    out = []
    for i, overrides in enumerate(members):
        if not isinstance(overrides, Mapping):
            raise PopulationError(f"member {i} is {overrides!r}: expected a dict of dotted overrides, "
                                  "e.g. {'train.lr': 1e-3}")
        for key in overrides:
            if key in known and key not in MEMBER_KEYS:
                what = "an architecture field" if key.startswith("model.") else "a field of the program"
                raise PopulationError(f"member {i} overrides {key!r}, {what}: members may differ only in "
                                      f"{', '.join(MEMBER_KEYS)}; train configs that differ in {key!r} as "
                                      "separate runs (or separate populations)")
        try:
            out.append(base.replace(**dict(overrides)))
        except ConfigError as e:  # an unknown key, named with its close matches
            raise ConfigError(f"member {i}: {e}") from None
    return out


# ----- per-member optimizer hyperparameters -------------------------------------------------------------


def schedule_hparams(train: TrainConfig) -> dict[str, float]:
    """The numbers `optim.schedule(train)` uses, computed in Python as it computes them (so that the traced
    `schedule` repeats its float32 arithmetic exactly): peak and final LR, warmup, cosine span and half-range,
    the wsd decay window."""
    warm, total, peak, final = train.warmup_steps, train.steps, train.lr, train.final_lr
    decay_steps = max(int(round(train.decay_fraction * (total - warm))), 1)
    return {
        "lr": peak, "final_lr": final, "warmup_steps": float(warm), "warmup_div": float(max(warm, 1)),
        "inv_warmup": _reciprocal(max(warm, 1)), "inv_span": _reciprocal(max(total - warm - 1, 1)),
        "half_range": (peak - final) * 0.5, "decay_start": float(total - decay_steps),
        "inv_decay_steps": _reciprocal(decay_steps), "drop": final - peak,
    }


def _reciprocal(n: int) -> float:
    """1/n as XLA folds `x / n` for a constant n: x * (1/n), the reciprocal rounded to float32."""
    return float(np.float32(1.0) / np.float32(n))


def schedule(kind: str, h: Mapping[str, jax.Array]) -> optax.Schedule:
    """`optim.schedule` of traced per-member numbers `h` (from `schedule_hparams`): the same formula, op by op
    as XLA compiles it (a division by a constant step count is a multiplication by its float32 reciprocal), so
    the two agree bit for bit. Only the schedule's kind is static."""

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        peak, final, warm = h["lr"], h["final_lr"], h["warmup_steps"]
        warmup = peak * jnp.minimum(1.0, (step + 1) * h["inv_warmup"])
        frac = jnp.clip(jnp.maximum(step - warm, 0.0) * h["inv_span"], 0.0, 1.0)
        if kind == "cosine":
            main = final + h["half_range"] * (1 + jnp.cos(math.pi * frac))
        elif kind == "wsd":
            start = h["decay_start"]
            main = jnp.where(step < start, peak,
                             peak + h["drop"] * jnp.clip((step - start + 1) * h["inv_decay_steps"], 0.0, 1.0))
        elif kind == "constant":
            main = jnp.full_like(step, 1.0) * peak
        else:  # inverse_sqrt, floored at final
            main = jnp.maximum(peak * jnp.sqrt(h["warmup_div"] / jnp.maximum(step, h["warmup_div"])), final)
        return jnp.where(step < warm, warmup, main)

    return fn


def optimizer_hparams(train: TrainConfig) -> dict[str, float]:
    """A member's optimizer hyperparameters: the schedule's numbers and the weight decay as `make_optimizer`
    applies it (0 for None; divided by the peak LR when weight_decay_mode is independent)."""
    decay = 0.0 if train.weight_decay is None else train.weight_decay
    if train.weight_decay_mode == "independent":
        decay = decay / train.lr
    return {**schedule_hparams(train), "weight_decay": decay}


def make_optimizer(train: TrainConfig, hparams: Mapping[str, Any] | None = None):
    """`optim.make_optimizer(train)`'s chain (clip, Adam, masked decay, LR at the train step) under
    `optax.inject_hyperparams`: the member's numbers live in `opt_state.hyperparams`, and `update` reads them
    from there. `hparams` (arrays, possibly traced) set them at `init`; `update` ignores the ones given here.
    The static fields (betas, eps, clip, decay mask, schedule kind) are the population's own."""

    def chain(**h):
        decay, lr_h = h["weight_decay"], {k: v for k, v in h.items() if k != "weight_decay"}
        parts = [] if train.grad_clip is None else [optax.clip_by_global_norm(train.grad_clip)]
        parts.append(optax.chain(
            optax.scale_by_adam(b1=train.beta1, b2=train.beta2, eps=train.eps),
            optax.add_decayed_weights(decay, mask=lambda p: optim.decay_mask(p, train.decay_embeddings)),
            optim.scale_by_train_step_lr(schedule(train.schedule, lr_h)),
        ))
        return optax.chain(*parts)

    names = tuple(optimizer_hparams(train))
    factory = _with_signature(chain, names)
    return optax.inject_hyperparams(factory)(**(optimizer_hparams(train) if hparams is None else hparams))


def _with_signature(fn, names: tuple[str, ...]):
    """`fn(**h)` with an explicit keyword signature (`inject_hyperparams` binds its arguments by name)."""

    def factory(**h):
        return fn(**h)

    factory.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names])
    return factory


def z_loss(weight: jax.Array) -> losses.LossFn:
    """`losses.z_loss` with a traced weight (0: the member has none): weight * mean(log^2 Z)."""

    def fn(logits, batch, aux=None):
        loss = weight * losses.masked_mean(jnp.square(losses.log_z(logits)), losses.loss_mask(batch))
        return loss, {"z_loss": loss}

    return fn


# ----- state, init and step ------------------------------------------------------------------------------


@flax.struct.dataclass
class PopulationState:
    members: steps.TrainState  # every leaf [M, ...]; opt_state.hyperparams holds each member's numbers
    z_loss: jax.Array  # float32[M]: each member's z-loss weight (0: off)
    diverged_at: jax.Array  # int32[M]: the step (1-based, as logged) of the first non-finite loss ("stop"); -1: none


def member_arrays(configs: Sequence[Config]) -> dict:
    """The per-member inputs of init: seeds int32[M], optimizer numbers float32[M] each, z-loss float32[M]."""
    hp = [optimizer_hparams(c.train) for c in configs]
    return {
        "seed": np.asarray([c.train.seed for c in configs], np.int32),
        "hparams": {k: np.asarray([h[k] for h in hp], np.float32) for k in hp[0]},
        "z_loss": np.asarray([0.0 if c.train.z_loss is None else c.train.z_loss for c in configs], np.float32),
    }


def make_mesh(n_members: int, devices=None) -> Mesh:
    """A 1-D mesh ("member") of gcd(P, device count) devices: the member axis is split over it."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices[: math.gcd(n_members, len(devices))]), (AXIS,))


def init_population(cfg: Config, configs: Sequence[Config], mesh: Mesh) -> PopulationState:
    """Member i's state is `steps.init_state` of configs[i] (same init key, dropout key, zero moments), with
    its optimizer numbers in the optimizer state; created sharded over the member axis."""
    mcfg, tcfg = cfg.model, cfg.train
    model, arrays = Transformer(mcfg), member_arrays(configs)

    def init_member(seed, hparams):
        tokens = jnp.zeros((1, min(8, mcfg.max_seq_len)), jnp.int32)
        params = nn.unbox(model.init({"params": jax.random.PRNGKey(seed)}, tokens)["params"])
        opt_state = make_optimizer(tcfg, hparams).init(params)
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                                rng=jax.random.PRNGKey(seed + 1))

    def init(seed, hparams, z):
        members = jax.vmap(init_member)(seed, hparams)
        return PopulationState(members=members, z_loss=z, diverged_at=jnp.full(z.shape, -1, jnp.int32))

    sharded = NamedSharding(mesh, P(AXIS))
    return jax.jit(init, out_shardings=sharded)(arrays["seed"], arrays["hparams"], arrays["z_loss"])


def make_population_step(cfg: Config, any_z_loss: bool):
    """The pure step `(PopulationState, batch) -> (PopulationState, metrics[M])`: `steps.make_train_step`
    vmapped over members, with each member's z-loss weight and optimizer numbers traced. The batch is one
    [B, T] batch shared by every member, or [M, B, T] (one per member); `make_population_step` itself does not
    care, the caller's `jax.vmap` axes do (see `jit_population_step`)."""
    mcfg, tcfg = cfg.model, cfg.train
    base_loss = steps.loss_from_config(dataclasses.replace(tcfg, z_loss=None))
    optimizer = make_optimizer(tcfg)  # update reads each member's numbers from its state
    freeze = tcfg.on_nonfinite == "stop"

    def member(state: steps.TrainState, z_weight, diverged_at, batch):
        loss_fn = losses.compose(base_loss, z_loss(z_weight)) if any_z_loss else base_loss
        new, metrics = steps.make_train_step(mcfg, tcfg, loss_fn, optimizer)(state, batch)
        finite = metrics["finite"] > 0
        lr_at = schedule(tcfg.schedule, state.opt_state.hyperparams)
        metrics["lr"] = jnp.where(finite, lr_at(state.step), 0.0)  # the member's own schedule
        if freeze:  # a diverged member stays where it was; its metrics after that step are NaN
            before = diverged_at >= 0
            diverged_at = jnp.where(before | finite, diverged_at, state.step + 1)
            stop = before | ~finite
            new = jax.tree.map(lambda a, b: jnp.where(stop, b, a), new, state)
            metrics = {k: jnp.where(before, jnp.full_like(v, 0.0 if k in ("finite", "lr") else jnp.nan), v)
                       for k, v in metrics.items()}
        return new, diverged_at, metrics

    def population_step(pstate: PopulationState, batch, batch_axis):
        members, diverged_at, metrics = jax.vmap(member, in_axes=(0, 0, 0, batch_axis))(
            pstate.members, pstate.z_loss, pstate.diverged_at, batch)
        return pstate.replace(members=members, diverged_at=diverged_at), metrics

    return population_step


def jit_population_step(step_fn, mesh: Mesh, shared_batch: bool):
    """jit with the state (donated) and metrics sharded over the member axis; a shared batch is replicated."""
    sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    axis = None if shared_batch else 0
    return jax.jit(lambda s, b: step_fn(s, b, axis), in_shardings=(sharded, replicated if shared_batch else sharded),
                   out_shardings=(sharded, sharded), donate_argnums=0)


def jit_population_eval(cfg: Config, mesh: Mesh):
    """`steps.make_eval_step` vmapped over the members' params, on one shared validation batch."""
    sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    fn = jax.vmap(steps.make_eval_step(cfg.model), in_axes=(0, None))
    return jax.jit(fn, in_shardings=(sharded, replicated), out_shardings=sharded)


# ----- the loop ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MemberRun(loop.Run):
    """One member's `Run` (history at the base's log steps, final state and params), plus its overrides and
    divergence. Its `state.opt_state` is `optax.inject_hyperparams`' state around the solo optimizer's state."""

    overrides: dict = dataclasses.field(default_factory=dict)
    diverged_at: int | None = None  # the step (1-based, as logged) whose loss was first non-finite ("stop" only)

    @property
    def val_loss(self) -> float | None:
        """The validation loss at the end (NaN for a member frozen by divergence; None without validation)."""
        for record in reversed(self.history):
            if "val_loss" in record:
                return record["val_loss"]
        return None


def _check_population(base: Config, configs: Sequence[Config], data) -> None:
    if jax.process_count() > 1:
        raise PopulationError("population.train runs in one process; train members as separate runs on a "
                              "multi-host job")
    if (base.mesh.fsdp, base.mesh.tensor) != (1, 1):
        raise PopulationError(f"population.train shards the member axis only; mesh.fsdp={base.mesh.fsdp} and "
                              f"mesh.tensor={base.mesh.tensor} must be 1 (train a sharded model as separate runs)")
    if data is not None and len({c.data.seed for c in configs}) > 1:
        raise PopulationError("members differ in data.seed but data= is one stream of batches: drop the "
                              "data.seed overrides, or let the population read config.data (data=None)")


def _member_data(base: Config, configs: Sequence[Config], data, val_data):
    """(tokenizer, batch stream, validation set, shared): one iterator per distinct data.seed, each step's
    batch shared by all members when there is one, else stacked [M, ...]; or the caller's batches."""
    if data is not None:
        stream, val = training.user_data(base, data, val_data)
        return None, stream, val, True
    tokenizer = training.load_tokenizer(base, base.train.progress)
    seeds = list(dict.fromkeys(c.data.seed for c in configs))
    by_seed = {s: dataio.make_train_iterator(dataclasses.replace(base.data, seed=s), base.train.batch_size)
               for s in seeds}
    shared = len(seeds) == 1
    stream = _member_batches([by_seed[c.data.seed] for c in configs], shared)
    return tokenizer, stream, training.validation_set(base), shared


def _evaluator(base: Config, mesh: Mesh, val: list[dict], n: int):
    """pstate -> one validation record per member (NaN for a member frozen by divergence; {} without val)."""
    eval_fn, replicated = jit_population_eval(base, mesh), NamedSharding(mesh, P())

    def evaluate(pstate: PopulationState) -> list[dict]:
        if not val:
            return [{} for _ in range(n)]
        loss = np.asarray(training.mean_loss([eval_fn(pstate.members.params, jax.device_put(b, replicated))
                                              for b in val]))
        dead = np.asarray(pstate.diverged_at) >= 0 if base.train.on_nonfinite == "stop" else np.zeros(n, bool)
        return [training.val_record(math.nan if d else float(v)) for v, d in zip(loss.tolist(), dead, strict=True)]

    return evaluate


def _member_records(done: int, values: dict, configs: Sequence[Config], rates, evals: list[dict]) -> list[dict]:
    """The log record of each member at step `done`: its slice of the metrics, the clock's rates, its eval."""
    records = []
    for i, config in enumerate(configs):
        record = training.log_record(done, {k: v[i] for k, v in values.items()}, *rates)
        if config.train.z_loss is None:
            record.pop("z_loss", None)  # a weight-0 term, only there because another member has one
        records.append({**record, **evals[i]})
    return records


def _show(bar, values: dict, pstate: PopulationState) -> None:
    finite = np.asarray(values["loss"])[np.isfinite(values["loss"])]
    if bar is not None and finite.size:
        bar.set_postfix(best_loss=f"{finite.min():.3f}", diverged=int((np.asarray(pstate.diverged_at) >= 0).sum()))


def _member_runs(configs, members, pstate: PopulationState, histories, tokenizer, val, stopped) -> list[MemberRun]:
    diverged = np.asarray(pstate.diverged_at).tolist()
    unigram = training.unigram_entropy(val) if val else None
    runs = []
    for i, (config, overrides) in enumerate(zip(configs, members, strict=True)):
        state = jax.tree.map(lambda x, i=i: x[i], pstate.members)
        at = None if diverged[i] < 0 else int(diverged[i])
        why = stopped
        if at is not None and config.train.on_nonfinite == "stop":
            why = f"non-finite loss at step {at}: the member was frozen there"
        runs.append(MemberRun(config=config, history=histories[i], state=state, params=state.params,
                              tokenizer=tokenizer, unigram_entropy=unigram, stopped=why,
                              overrides=dict(overrides), diverged_at=at))
    return runs


def train(base: Config, members: Sequence[Mapping[str, Any]], *, data: loop.Batches | None = None,
          val_data: loop.Batches | None = None, progress: bool | None = None, echo=print) -> list[MemberRun]:
    """Train every member of `members` (dicts of dotted overrides of `base`, keys from MEMBER_KEYS) as one
    jitted program; returns one `MemberRun` per member, in order.

    data: None reads `config.data` (one iterator per distinct data.seed); or one iterable of batches that every
        member trains on (as in `lecture3.train`); `val_data` then is the validation set.
    Logged at the base's log steps, evaluated on the fixed validation set at its eval steps and at the end, as
    `lecture3.train` does. `tokens_per_s` in a record is one member's (the population's is P times it); `mfu`
    is the population's. No workdir: nothing is checkpointed or written.
    """
    base = base if progress is None else base.replace(**{"train.progress": bool(progress)})
    configs = member_configs(base, members)
    _check_population(base, configs, data)
    tcfg, n = base.train, len(configs)
    tokenizer, stream, val, shared = _member_data(base, configs, data, val_data)
    mesh = make_mesh(n)
    step_fn = jit_population_step(make_population_step(base, any(c.train.z_loss is not None for c in configs)),
                                  mesh, shared)
    evaluate = _evaluator(base, mesh, val, n)
    batch_sharding = NamedSharding(mesh, P() if shared else P(AXIS))
    pstate = init_population(base, configs, mesh)
    clock = training.clock(base, len(mesh.devices.flat), echo, members=n)
    histories, loss_meter = [loop.History() for _ in range(n)], meter.LossMeter()
    bar, stopped, done = training.progress_bar(tcfg, f"population of {n}"), None, 0
    try:
        for step in range(tcfg.steps):
            batch = next(stream, None)
            if batch is None:
                stopped = f"the data ran out after {step} steps"
                break
            pstate, metrics = step_fn(pstate, jax.device_put(batch, batch_sharding))
            loss_meter.add(metrics)
            done, now = step + 1, training.due(tcfg, step + 1)
            clock.step(metrics)
            if now.log or now.eval:  # log (and evaluate), one record per member
                values, rates = loss_meter.take(jax.device_get(metrics)), clock.rates()
                evals = evaluate(pstate) if now.eval else [{}] * n
                for history, record in zip(histories, _member_records(done, values, configs, rates, evals),
                                           strict=True):
                    history.append(record)
                _show(bar, values, pstate)
                clock.restart()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if stopped and val and done and not (histories[0] and histories[0][-1]["step"] == done):
        for history, ev in zip(histories, evaluate(pstate), strict=True):  # the end is evaluated, as always
            history.append({"step": done, **ev})
    return _member_runs(configs, members, pstate, histories, tokenizer, val, stopped)


def _member_batches(iterators: list, shared: bool):
    """One batch for all (shared), or each step the members' batches stacked [M, ...] (an iterator that
    several members share is read once per step)."""
    while True:
        if shared:
            yield next(iterators[0])
            continue
        now = {id(it): next(it) for it in dict.fromkeys(iterators)}
        rows = [now[id(it)] for it in iterators]
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}

