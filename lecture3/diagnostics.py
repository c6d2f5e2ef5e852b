"""Per-layer training signals: gradient norm, update-to-parameter ratio and largest attention logit per layer.

The lecture's stability claims are read per layer (post-norm's gradients grow with depth at init; attention
logits blow up in some layers first), so the train step can log these when `TrainConfig.log_per_layer` is on.
Each function maps a params-shaped tree to float32[L], in layer order, scanned or not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lecture3.config import ModelConfig
from lecture3.model import unstack_layers


def tree_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together, in float32."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def layer_norms(cfg: ModelConfig, tree) -> jax.Array:
    """float32[L]: the L2 norm of each layer's leaves of a params-shaped tree (params, grads, updates)."""
    return jnp.stack([tree_norm(layer) for layer in unstack_layers(cfg, tree)])


def per_layer_metrics(cfg: ModelConfig, grads, updates, params, attn_logit_max: jax.Array | None = None) -> dict:
    """{"grad_norm_layer", "update_ratio_layer", "max_attn_logit_layer"}: float32[L] each (the last only when
    the per-head attention-logit maxima float32[L, N] are given)."""
    out = {
        "grad_norm_layer": layer_norms(cfg, grads),
        "update_ratio_layer": layer_norms(cfg, updates) / jnp.maximum(layer_norms(cfg, params), 1e-12),
    }
    if attn_logit_max is not None:
        out["max_attn_logit_layer"] = jnp.max(attn_logit_max, axis=-1)
    return out


def flatten_layers(record: dict) -> dict:
    """A record whose per-layer arrays become scalars `name/i` (TensorBoard groups them by `name`)."""
    flat = {}
    for key, value in record.items():
        if key.endswith("_layer") and getattr(value, "ndim", 0) == 1:
            flat.update({f"{key[: -len('_layer')]}/{i}": float(v) for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat
