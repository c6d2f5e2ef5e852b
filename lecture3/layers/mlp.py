"""Feed-forward layers: plain activations and the gated linear unit family (Shazeer 2020).

Plain:  down(act(up(x)))                  d_ff = 4 d_model by default
Gated:  down(act(gate(x)) * up(x))        d_ff = 8/3 d_model by default: three matrices, same parameters
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lecture3.config import ModelConfig
from lecture3.layers.common import DTYPES, constrain, dense, normal, param


def relu2(x: jax.Array) -> jax.Array:
    """Squared ReLU (So et al. 2021, Primer)."""
    return jnp.square(jax.nn.relu(x))


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu2": relu2,
    # gated: the activation applied to the gate branch
    "reglu": jax.nn.relu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=False),
    "geglu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "swiglu": jax.nn.silu,
}


def mlp(x: jax.Array, up: jax.Array, down: jax.Array, act, gate: jax.Array | None = None,
        up_bias=None, down_bias=None, gate_bias=None) -> jax.Array:
    """x: [B, T, D]; up, gate: [D, F]; down: [F, D]. Gated when `gate` is given."""
    h = dense(x, up)  # [B, T, F]
    if up_bias is not None:
        h = h + up_bias
    if gate is None:
        h = act(h)
    else:
        g = dense(x, gate)
        if gate_bias is not None:
            g = g + gate_bias
        h = act(g) * h
    y = dense(h, down)  # [B, T, D]
    return y if down_bias is None else y + down_bias


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, f, dt = cfg.d_model, cfg.resolved_d_ff, DTYPES[cfg.dtype]
        init = normal(cfg.init_std)
        out_init = normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)  # GPT-2's residual-branch scaling

        def bias(name, n, axes):
            if not cfg.mlp_bias:
                return None
            return param(self, name, (n,), axes, nn.initializers.zeros, cfg.param_dtype).astype(dt)

        up = param(self, "up", (d, f), ("embed", "mlp"), init, cfg.param_dtype).astype(dt)
        gate = param(self, "gate", (d, f), ("embed", "mlp"), init, cfg.param_dtype).astype(dt) if cfg.gated else None
        up_b = bias("up_bias", f, ("mlp",))
        gate_b = bias("gate_bias", f, ("mlp",)) if cfg.gated else None
        down = param(self, "down", (f, d), ("mlp", "embed"), out_init, cfg.param_dtype).astype(dt)
        down_b = bias("down_bias", d, ("embed",))
        x = x.astype(dt)
        y = mlp(x, up, down, ACTIVATIONS[cfg.activation], gate, up_b, down_b, gate_b)
        return constrain(y, ("batch", "length", "embed"))
