"""Loss terms as pure functions of `(logits, batch) -> (scalar, metrics)`, and their composition.

A term is any function with that signature; `compose` adds them. Everything is float32, whatever
the model's compute dtype. `batch` holds at least `targets` int[B, T] and optionally `loss_mask`
float[B, T] (0 where the target is padding).

    loss_fn = losses.compose(losses.cross_entropy(), losses.z_loss(1e-4))
    loss, metrics = loss_fn(logits, batch)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def loss_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    """float32[B, T]: the batch's `loss_mask`, or ones when it has none."""
    targets = batch["targets"]
    mask = batch.get("loss_mask")
    return jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def log_z(logits: jax.Array) -> jax.Array:
    """log of the softmax normaliser, float32[B, T]."""
    return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


def cross_entropy(name: str = "cross_entropy") -> LossFn:
    """Masked token-level cross-entropy in nats."""

    def fn(logits, batch):
        logits = logits.astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        loss = masked_mean(log_z(logits) - target_logit, loss_mask(batch))
        return loss, {name: loss}

    return fn


def z_loss(weight: float = 1e-4, name: str = "z_loss") -> LossFn:
    """weight * mean(log^2 Z): keeps the softmax normaliser near 1 (PaLM, Chowdhery et al. 2022: 1e-4)."""

    def fn(logits, batch):
        loss = weight * masked_mean(jnp.square(log_z(logits)), loss_mask(batch))
        return loss, {name: loss}

    return fn


def compose(*terms: LossFn) -> LossFn:
    """The sum of the terms; the metrics of all of them, plus `loss` (the total)."""
    if not terms:
        raise ValueError("losses.compose needs at least one term, e.g. losses.cross_entropy()")

    def fn(logits, batch):
        total, metrics = jnp.zeros((), jnp.float32), {}
        for term in terms:
            value, m = term(logits, batch)
            total = total + value
            metrics.update(m)
        metrics["loss"] = total
        return total, metrics

    return fn


TERMS: dict[str, Callable[..., LossFn]] = {"cross_entropy": cross_entropy, "z_loss": z_loss}


def from_config(terms: Mapping[str, float | None]) -> LossFn:
    """Build the composed loss from `{name: weight}`; `cross_entropy` takes no weight (use None)."""
    fns = []
    for name, weight in terms.items():
        if name not in TERMS:
            raise ValueError(f"unknown loss term {name!r}: expected one of {sorted(TERMS)}")
        fns.append(TERMS[name]() if weight is None else TERMS[name](weight))
    return compose(*fns)
