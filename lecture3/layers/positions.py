"""Position schemes as pure functions of integer positions.

Absolute (added to the embeddings): sinusoidal (Vaswani 2017), learned (GPT-1/2/3).
Relative (inside attention): RoPE (Su 2021) rotates q and k; ALiBi (Press 2021) and T5's bucketed bias
(Raffel 2020) add a per-head bias to the attention logits. `none` is NoPE: the causal mask alone.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lecture3.config import RopeScaling


def sinusoidal(positions: jax.Array, d: int, base: float = 10_000.0) -> jax.Array:
    """positions: int[B, T] -> float32[B, T, D]; even dims sin, odd dims cos, as in Vaswani et al."""
    inv = 1.0 / base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
    angles = positions[..., None].astype(jnp.float32) * inv  # [B, T, D/2]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, d)


def rope_frequencies(rotary_dims: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies [rotary_dims / 2]; Llama 3 slows the low frequencies by `scaling.factor`."""
    inv = 1.0 / theta ** (np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims)
    if scaling is None:
        return inv.astype(np.float32)
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, layout: str = "half") -> jax.Array:
    """Rotate pairs of the first R = 2 len(inv_freq) dims of each head by position * freq; dims past R pass
    through unrotated (GPT-NeoX's partial rotary).

    x: [B, T, N, H]; positions: int[B, T]. `layout` says which dims form pair i: "half" rotates (i, i + R/2)
    (GPT-NeoX, Hugging Face Llama), "interleaved" rotates (2i, 2i + 1) (RoFormer, GPT-J, Meta's Llama).
    The two are one model up to a permutation of q's and k's head dims (`rope_permutation`).
    """
    if layout not in ("half", "interleaved"):
        raise ValueError(f"rope layout {layout!r} is invalid: expected 'half' or 'interleaved'")
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, R/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, R/2]
    sin = jnp.sin(angles)[:, :, None, :]
    return _rotate(x.astype(jnp.float32), cos, sin, layout).astype(x.dtype)


def _pairs(x: jax.Array, r: int, layout: str) -> tuple[jax.Array, jax.Array]:
    rot = x[..., :r]
    return (rot[..., : r // 2], rot[..., r // 2:]) if layout == "half" else (rot[..., 0::2], rot[..., 1::2])


def _unpairs(a: jax.Array, b: jax.Array, rest: jax.Array, layout: str) -> jax.Array:
    rotated = jnp.concatenate([a, b], axis=-1) if layout == "half" else jnp.stack([a, b], -1).reshape(
        *a.shape[:-1], 2 * a.shape[-1])
    return jnp.concatenate([rotated, rest], axis=-1)


def _rotation(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on each pair; dims past the pairs pass through."""
    r = 2 * cos.shape[-1]
    x1, x2 = _pairs(x, r, layout)
    return _unpairs(x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:], layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """`_rotation` with its own VJP: the transpose of a rotation is the rotation by minus the angle, one
    more rotation of the cotangent, where autodiff through the slices and the concatenation pads and adds
    (~4% of the default model's train step)."""
    return _rotation(x, cos, sin, layout)


def _rotate_fwd(x, cos, sin, layout):
    return _rotation(x, cos, sin, layout), (x, cos, sin)


def _rotate_bwd(layout, res, g):
    x, cos, sin = res
    r = 2 * cos.shape[-1]
    (x1, x2), (g1, g2) = _pairs(x, r, layout), _pairs(g, r, layout)
    sum_heads = lambda y: jnp.sum(y, axis=2, keepdims=True)  # noqa: E731  cos, sin: [B, T, 1, R/2]
    return _rotation(g, cos, -sin, layout), sum_heads(g1 * x1 + g2 * x2), sum_heads(g2 * x1 - g1 * x2)


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def rope_permutation(head_dim: int, rotary_dims: int) -> np.ndarray:
    """Head-dim indices p with half-layout dim j = interleaved dim p[j]: (0, 2, .., R-2, 1, 3, .., R-1, R, ..).

    Taking q's and k's head dims in this order turns an "interleaved" model into the same function in the
    "half" layout (the permutation of Hugging Face's convert_llama_weights_to_hf); argsort(p) goes back.
    """
    return np.concatenate([np.arange(0, rotary_dims, 2), np.arange(1, rotary_dims, 2),
                           np.arange(rotary_dims, head_dim)])


def alibi_slopes(n_heads: int) -> np.ndarray:
    """Geometric slopes 2^(-8 i / n); for n not a power of two, interleave those of 2n (Press et al.)."""
    def power_of_two(n):
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return np.asarray(slopes, dtype=np.float32)


def alibi_bias(q_pos: jax.Array, k_pos: jax.Array, n_heads: int) -> jax.Array:
    """-slope_n * (q - k): int[B, T], int[B, S] -> float32[B, N, T, S]; a linear penalty on distance."""
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)  # [B, T, S]
    return -jnp.asarray(alibi_slopes(n_heads))[None, :, None, None] * dist[:, None]


def t5_bucket(relative: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
    """T5's causal bucketing of k - q: exact for small distances, logarithmic up to max_distance."""
    n = jnp.maximum(-relative, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return jnp.where(is_small, n, large)


def t5_bias(q_pos: jax.Array, k_pos: jax.Array, table: jax.Array, max_distance: int) -> jax.Array:
    """Learned per-head bias of the bucketed distance: table [buckets, N] -> float32[B, N, T, S]."""
    buckets = t5_bucket(k_pos[:, None, :] - q_pos[:, :, None], table.shape[0], max_distance)  # [B, T, S]
    return jnp.moveaxis(table.astype(jnp.float32)[buckets], -1, 1)
