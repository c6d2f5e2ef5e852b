"""AdamW with a weight-decay mask, global-norm clipping and the usual learning-rate schedules.

The lecture: weight decay still matters in pre-training, less as regularisation than through its
interaction with the learning-rate schedule. The decay rule (`decay_mask`) reads each parameter's shape, as
nanoGPT's `dim >= 2` rule does, so a new parameter needs no entry in a list:

  decayed        every matrix: two or more axes, not counting the stacked layer axis of `scan_layers`
                 (q, k, v, o, up, gate, down)
  never          vectors (norm gains, qk-norm gains) and biases, whose per-head ones have two axes (N, H)
                 but are one vector per output unit
  on request     with `decay_embeddings`: the embedding-like tables, by name (EMBEDDING_NAMES): the token
                 embedding, the head (tied or untied, so a tie ablation changes one thing), the learned
                 position table, the T5 relative-bias table

The learning rate follows the *train step* (`step=` passed to `update`), not optax's own update count:
a step that the train step skips (non-finite loss) still uses up its place in the schedule, while Adam's
moments and bias-correction count stay as they were (`lecture3.steps.make_train_step`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lecture3.config import TrainConfig

EMBEDDING_NAMES = ("embed", "head", "pos_embed", "rel_bias")  # decayed only with decay_embeddings
SCANNED_LAYERS = "layers"  # with scan_layers, the params key whose leaves stack the layers on a leading axis


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / warmup-stable-decay / constant / inverse-sqrt to `final_lr`.

    Warmup is lr * (step + 1) / warmup_steps: step 0 already trains at lr / warmup_steps (not 0), and
    step warmup_steps - 1 reaches lr. Cosine, wsd and inverse-sqrt then reach `final_lr` at step
    `steps - 1`, the last step of the run.
    """
    warm, total, peak, final = cfg.warmup_steps, cfg.steps, cfg.lr, cfg.final_lr

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * jnp.minimum(1.0, (step + 1) / max(warm, 1))
        after = jnp.maximum(step - warm, 0.0)
        span = max(total - warm - 1, 1)
        frac = jnp.clip(after / span, 0.0, 1.0)
        if cfg.schedule == "cosine":
            main = final + (peak - final) * 0.5 * (1 + jnp.cos(math.pi * frac))
        elif cfg.schedule == "wsd":
            decay_steps = max(int(round(cfg.decay_fraction * (total - warm))), 1)
            start = total - decay_steps
            main = jnp.where(step < start, peak,
                             peak + (final - peak) * jnp.clip((step - start + 1) / decay_steps, 0.0, 1.0))
        elif cfg.schedule == "constant":
            main = jnp.full_like(step, peak)
        else:  # inverse_sqrt, floored at final
            main = jnp.maximum(peak * jnp.sqrt(max(warm, 1) / jnp.maximum(step, max(warm, 1))), final)
        return jnp.where(step < warm, warmup, main)

    return fn


def is_matrix(names: list[str], shape: tuple[int, ...]) -> bool:
    """Two or more axes of weights (a scanned stack's leading layer axis not counted), and not a bias."""
    stacked = 1 if names[0] == SCANNED_LAYERS else 0
    return len(shape) - stacked >= 2 and not names[-1].endswith("bias")


def decay_mask(params, decay_embeddings: bool = False):
    """True for the leaves AdamW decays (the rule in the module docstring); the same answer for a boxed
    tree (flax's `LogicallyPartitioned`, as `Transformer.init` returns it) and its `nn.unbox`."""

    def decide(path, leaf):
        # a box wrapper adds an attribute key (`.value`) under the parameter's name: decide by dict keys only
        names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        if names[-1] in EMBEDDING_NAMES:
            return decay_embeddings
        return is_matrix(names, leaf.shape)

    return jax.tree_util.tree_map_with_path(decide, params)


def scale_by_train_step_lr(lr_at: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """Multiply the updates by -lr_at(step), `step` being the train step given as `update(..., step=s)`.

    Without `step=` it falls back to its own count of updates, like `optax.scale_by_learning_rate`
    (whose state it shares, so checkpoints of either restore into the other).
    """

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, step=None, **extra):
        del params, extra
        lr = lr_at(state.count if step is None else step)
        updates = jax.tree.map(lambda g: jnp.asarray(-lr, g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """Clip by global norm, then AdamW (optax.adamw's chain) with the decay mask and the schedule read
    at the train step: `update(grads, state, params, step=state.step)`.

    `weight_decay_mode` (Wortsman et al. 2023, section 3.2.2, contrast the two):
      decoupled    AdamW as optax and PyTorch write it: each step subtracts lr_t * weight_decay * param, so
                   the decay per step scales with the peak learning rate;
      independent  each step subtracts (lr_t / lr) * weight_decay * param: the decay follows the schedule's
                   shape but not the peak LR, so an LR sweep does not also sweep the decay.
    """
    decay = 0.0 if cfg.weight_decay is None else cfg.weight_decay
    if cfg.weight_decay_mode == "independent":
        decay = decay / cfg.lr  # the update is multiplied by lr_t below: lr_t * decay / lr
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.chain(
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
        optax.add_decayed_weights(decay, mask=lambda p: decay_mask(p, cfg.decay_embeddings)),
        scale_by_train_step_lr(schedule(cfg)),
    ))
    return optax.chain(*parts)
