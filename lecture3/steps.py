"""The pure, sharded train step: `train_step(state, batch) -> (state, metrics)`.

Params are created already sharded (`eval_shape` -> logical specs -> mesh shardings -> `jit(init,
out_shardings=...)`); the step is jitted once with explicit in/out shardings and donates its state.
The RNG of step s is `fold_in(seed_key, s)`, so a resumed run draws exactly the same dropout masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lecture3 import diagnostics, losses, runtime
from lecture3.config import ModelConfig, TrainConfig
from lecture3.model import Transformer, head_logits, head_matrix
from lecture3.optim import make_optimizer, schedule
from lecture3.sharding import batch_sharding, tree_shardings

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: the run's base key; step s uses fold_in(rng, s)


def loss_from_config(train: TrainConfig) -> losses.LossFn:
    """The terms of `train.loss` (e.g. "cross_entropy+logit_l2:1e-5"), plus z-loss when `train.z_loss` is set."""
    terms = dict(losses.parse_terms(train.loss))
    if train.z_loss is not None:
        terms["z_loss"] = (train.z_loss,)
    return losses.from_config(terms)


def model_inputs(cfg: ModelConfig, batch: Batch) -> dict:
    """Positions restart per document and segment ids mask across documents only with document_mask."""
    if not cfg.document_mask:
        return {}
    return {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}


def batch_splits(cfg: ModelConfig, train: TrainConfig, mesh: Mesh) -> int:
    """How many independent parts of the batch the train step's layers take (`make_train_step`'s `splits`,
    `Transformer`'s): 2 on a one-device CPU mesh with two or more cores, where XLA:CPU runs the two halves'
    ops side by side on the cores (1.08-1.13x the step of the default model; benchmarks/train_step_vs_torch.py,
    variant `jax_one_pass`); else 1. Only where it cannot change the maths: an even batch and no dropout (the
    halves would draw their masks apart). Any loss term may run: the model joins the halves' captures."""
    one_cpu = mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu" and runtime.cpu_cores() >= 2
    return 2 if one_cpu and train.batch_size % 2 == 0 and not cfg.has_dropout else 1


def _captures(cfg: ModelConfig, loss_fn: losses.LossFn, logit_max: bool | None) -> tuple[str, ...]:
    """What the forward captures: what the terms need and, with `logit_max`, each head's largest attention logit
    (see `forward_metrics`)."""
    if logit_max is None:
        logit_max = cfg.attention_impl != "cudnn"
    return tuple(dict.fromkeys((*(("attn_logit_max",) if logit_max else ()), *losses.required(loss_fn))))


def forward_metrics(model: Transformer, params, batch: Batch, loss_fn: losses.LossFn, rng=None, splits: int = 1,
                    logit_max: bool | None = None):
    """Loss, its terms, and the stability signals: largest attention logit and mean |log Z|. The model
    captures what the loss terms need (`losses.required`) plus, with `logit_max`, each head's largest
    attention logit (logged as `max_attn_logit`); the terms see them, with the params, in `aux`.
    Returns (loss, (metrics, captured)).
    `logit_max`: None (default) = unless attention_impl='cudnn': dense and chunked attention have it from
    their softmax, the fused kernel never forms the logits (reading them rebuilds the T x S product).
    `splits`: the layers take the batch in that many independent parts (`Transformer`'s `splits`)."""
    deterministic = rng is None
    names = _captures(model.cfg, loss_fn, logit_max)
    out = model.apply(
        {"params": params}, batch["inputs"], **model_inputs(model.cfg, batch), deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng}, capture=names, splits=splits)
    loss, metrics = losses.call(loss_fn, out.logits, batch, {"params": params, **out.captured})
    mask = losses.loss_mask(batch)
    metrics["log_z_abs"] = losses.masked_mean(jnp.abs(losses.log_z(out.logits)), mask)
    if "attn_logit_max" in out.captured:
        metrics["max_attn_logit"] = jnp.max(out.captured["attn_logit_max"])
    return loss, (metrics, out.captured)


def forward_metrics_chunked(model: Transformer, params, batch: Batch, loss_fn: losses.LossFn, chunk: int, rng=None,
                            splits: int = 1, logit_max: bool | None = None):
    """`forward_metrics` without the full logits: the model stops before its head, and the head, the loss terms
    that read the logits and |log Z| run `chunk` positions at a time (`losses.chunked`): the same loss,
    gradients and metrics up to float rounding, with one chunk's [B, chunk, V] float32 logits live at once."""
    cfg, deterministic = model.cfg, rng is None
    names = _captures(cfg, loss_fn, logit_max)
    out = model.apply(
        {"params": params}, batch["inputs"], **model_inputs(cfg, batch), deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng}, capture=names, splits=splits, head=False)
    w = head_matrix(cfg, params)
    loss, metrics = losses.chunked(loss_fn, out.hidden, lambda x: head_logits(cfg, x, w), batch,
                                   {"params": params, **out.captured}, chunk,
                                   metrics=lambda logits, targets, lz: {"log_z_abs": jnp.abs(lz)})
    if "attn_logit_max" in out.captured:
        metrics["max_attn_logit"] = jnp.max(out.captured["attn_logit_max"])
    return loss, (metrics, out.captured)


def make_train_step(cfg: ModelConfig, train: TrainConfig, loss_fn: losses.LossFn | None = None,
                    optimizer: optax.GradientTransformation | None = None, splits: int = 1) -> Callable:
    """The pure step. `loss_fn` defaults to the config's terms; pass your own composition to add one.
    `splits`: the forward in that many independent parts of the batch (`batch_splits` says how many
    lecture3 uses for a mesh); the loss, gradients and update are the same up to float rounding.
    With `train.loss_chunk` the head and the loss run that many positions at a time (`forward_metrics_chunked`):
    the same again up to float rounding, without the [B, T, V] logits; every term of `loss_fn` must then be
    a `losses.token_term` or `losses.logits_free`.

    The optimizer is called as `update(grads, opt_state, params, step=state.step)`: `make_optimizer`'s
    learning rate follows the train step, and an optimizer that takes no extra arguments ignores it.
    The logged `lr` is the one multiplied into the applied update: `schedule(train)(state.step)`, which
    is exact for `make_optimizer(train)`; a user optimizer with a schedule of its own logs the config's.

    A non-finite step (loss or gradient norm) changes no parameter and no optimizer moment, and logs
    `finite=0`, `lr=0` and `update_ratio=0` (nothing was applied; loss and grad_norm are as measured):
      skip  the step is used up: `state.step` advances, so the schedule stays on time and still ends at
            `final_lr`, while Adam's moments and bias-correction count stay those of the last good step
      stop  the returned state is the input state, `step` included (the caller stops on `finite == 0`)
    """
    model = Transformer(cfg)
    loss_fn = loss_from_config(train) if loss_fn is None else loss_fn
    optimizer = optax.with_extra_args_support(make_optimizer(train) if optimizer is None else optimizer)
    lr_at = schedule(train)
    skip = train.on_nonfinite == "skip"

    chunk = train.loss_chunk
    if chunk is not None:
        losses.check_chunkable(loss_fn)  # here, before anything is traced

    def forward(params, batch: Batch, rng):
        logit_max = train.log_per_layer or None
        if chunk is None:
            return forward_metrics(model, params, batch, loss_fn, rng, splits, logit_max)
        return forward_metrics_chunked(model, params, batch, loss_fn, chunk, rng, splits, logit_max)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(lambda p: forward(p, batch, rng), has_aux=True)
        (loss, (metrics, captured)), grads = grad_fn(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, step=state.step)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        step = state.step + 1 if skip else jnp.where(finite, state.step + 1, state.step)
        ratio = optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(state.params), 1e-12)
        metrics.update(
            grad_norm=grad_norm,
            update_ratio=jnp.where(finite, ratio, 0.0),
            lr=jnp.where(finite, lr_at(state.step), 0.0),
            finite=finite.astype(jnp.float32),
        )
        if train.log_per_layer:
            metrics.update(diagnostics.per_layer_metrics(cfg, grads, updates, state.params,
                                                         captured["attn_logit_max"]))
        return state.replace(step=step, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(cfg: ModelConfig) -> Callable:
    model, ce = Transformer(cfg), losses.cross_entropy()

    def eval_step(params, batch: Batch) -> dict:
        """Summed token loss and token count, so batches of any mask average exactly."""
        logits = model.apply({"params": params}, batch["inputs"], **model_inputs(cfg, batch)).logits
        mask = losses.loss_mask(batch)
        loss, _ = ce(logits, batch)
        return {"loss_sum": loss * mask.sum(), "tokens": mask.sum()}

    return eval_step


def _boxed_init(cfg: ModelConfig, train: TrainConfig, optimizer):
    model = Transformer(cfg)

    def init(rng):
        tokens = jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)
        params = model.init({"params": rng}, tokens)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.PRNGKey(train.seed + 1))

    return init


def state_shardings(cfg: ModelConfig, train: TrainConfig, mesh: Mesh, rules, optimizer=None):
    """(abstract state, its NamedShardings): from the logical names of an `eval_shape` of init."""
    optimizer = make_optimizer(train) if optimizer is None else optimizer
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(_boxed_init(cfg, train, optimizer), jax.random.PRNGKey(train.seed))
    shardings = tree_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    return abstract, shardings


def init_state(cfg: ModelConfig, train: TrainConfig, mesh: Mesh, rules, optimizer=None,
               shardings=None) -> TrainState:
    """The initial state, created directly in its shards (no full copy on one device). Pass the
    `shardings` of `state_shardings` when you have them, to skip a second `eval_shape` of init."""
    optimizer = make_optimizer(train) if optimizer is None else optimizer
    if shardings is None:
        _, shardings = state_shardings(cfg, train, mesh, rules, optimizer)
    init = _boxed_init(cfg, train, optimizer)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(jax.random.PRNGKey(train.seed))


def jit_train_step(step_fn: Callable, mesh: Mesh, rules, shardings) -> Callable:
    """jit with explicit shardings and a donated state; activations are constrained by the same rules."""
    data = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step_fn, in_shardings=(shardings, data), out_shardings=(shardings, replicated),
                     donate_argnums=0)
    return _under_mesh(jitted, mesh, rules)


def jit_eval_step(eval_fn: Callable, mesh: Mesh, rules, param_shardings) -> Callable:
    data = batch_sharding(mesh, rules)
    jitted = jax.jit(eval_fn, in_shardings=(param_shardings, data), out_shardings=NamedSharding(mesh, P()))
    return _under_mesh(jitted, mesh, rules)


def _under_mesh(jitted: Callable, mesh: Mesh, rules) -> Callable:
    """Call `jitted` with the mesh and the axis rules active, so tracing applies the activation constraints."""

    def run(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(*args)

    run.jitted = jitted
    return run
