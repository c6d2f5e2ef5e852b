"""Parameter creation with logical axis names, dtype handling and dropout shared by all layers."""

from __future__ import annotations

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class Inputs:
    """What every layer of one forward reads besides the residual stream (built once by `Transformer`).

    q_idx: int32[B, T], each token's place in the stream: the causal and window masks (the cache offset when
        decoding). positions: int32[B, T], what the position encodings read (restarting per packed document).
    segment_ids: int32[B, T] document ids, for `document_mask` (None: one document). rel_table: T5's relative
    bias table [buckets, N], shared by all layers (None unless position="relative")."""

    q_idx: jax.Array
    positions: jax.Array
    segment_ids: jax.Array | None = None
    rel_table: jax.Array | None = None

    def rows(self, lo: int, hi: int) -> Inputs:
        """The inputs of batch rows lo..hi-1 (the shared table stays whole)."""
        seg = None if self.segment_ids is None else self.segment_ids[lo:hi]
        return self.replace(q_idx=self.q_idx[lo:hi], positions=self.positions[lo:hi], segment_ids=seg)


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init, dtype):
    """A parameter tagged with logical axis names, so one table of rules can shard it onto any mesh."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, DTYPES[dtype])


def normal(std: float):
    return nn.initializers.normal(stddev=std)


def dropout(module: nn.Module, x: jax.Array, rate: float | None, deterministic: bool) -> jax.Array:
    """Inverted dropout; `rate=None` is off, and so is evaluation (`deterministic=True`)."""
    if rate is None or deterministic:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Logit soft-capping (Gemma 2): cap * tanh(x / cap) keeps |x| < cap smoothly; None is off."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Shard an activation by logical axes; a no-op when no axis rules are active."""
    return nn.with_logical_constraint(x, axes)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """Contract the last `n_in` axes of x with the first `n_in` axes of w as one 2-D matmul.

    Same maths as the einsum ("btd,dnh->btnh", "btnh,nhd->btd", ...); written as [B*T, in] @ [in, out]
    because XLA's CPU backend otherwise surrounds the 4-D einsums (and their gradients) with layout
    transposes that cost about as much as the matmuls (benchmarks/train_step_vs_torch.py).
    """
    lead, inner = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in:]
    out = w.shape[n_in:]
    k = math.prod(inner)
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out)
