"""AdamW with a weight-decay mask, global-norm clipping and the usual learning-rate schedules.

The lecture: weight decay still matters in pre-training, less as regularisation than through its
interaction with the learning-rate schedule. Norm gains and biases are never decayed (they are
scales and offsets, not weights); embeddings optionally.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lecture3.config import TrainConfig

EMBEDDING_NAMES = ("embed", "pos_embed", "rel_bias")


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / warmup-stable-decay / constant / inverse-sqrt to `final_lr`."""
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


def decay_mask(params, decay_embeddings: bool = False):
    """True for the leaves AdamW decays: matrices only; never norm gains/biases; embeddings on request."""

    def decide(path, leaf):
        names = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
        last = names[-1]
        if last in EMBEDDING_NAMES:
            return decay_embeddings
        if last == "scale" or last.endswith("bias") or last in ("q_norm", "k_norm"):
            return False
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(
        learning_rate=schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
        weight_decay=0.0 if cfg.weight_decay is None else cfg.weight_decay,
        mask=lambda p: decay_mask(p, cfg.decay_embeddings),
    ))
    return optax.chain(*parts)
