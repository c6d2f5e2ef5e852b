"""LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) as pure functions, plus their module.

Both compute in float32 whatever the activation dtype: the variance of a bf16 vector is not.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lecture3.config import ModelConfig
from lecture3.layers.common import param


def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """Subtract the mean, divide by the standard deviation, then gain and bias."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """Divide by the root mean square; no mean, no bias: fewer parameters and memory reads."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


NORMS = {
    "layernorm": lambda x, scale, bias, eps: layer_norm(x, scale, bias, eps),
    "rmsnorm": lambda x, scale, bias, eps: rms_norm(x, scale, eps),
    "none": lambda x, scale, bias, eps: x,
}


class Norm(nn.Module):
    """The configured norm over the last axis; owns its gain (and LayerNorm bias) when configured."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.norm == "none":
            return x
        d = x.shape[-1]
        scale = param(self, "scale", (d,), ("norm",), nn.initializers.ones, cfg.param_dtype) if cfg.norm_scale else None
        bias = param(self, "bias", (d,), ("norm",), nn.initializers.zeros, cfg.param_dtype) if cfg.norm_bias else None
        return NORMS[cfg.norm](x, scale, bias, cfg.norm_eps)
