"""The KV cache of decoding: per layer, S slots of keys and values, a ring buffer for sliding windows.

One layer's cache is a dict of arrays (so it scans, jits and sums like any pytree):

    k, v  [B, S, K, H]  keys (after RoPE) and values of the last S tokens; K = n_kv_heads, so MQA and
                        GQA store n_heads / n_kv_heads times less than MHA
    idx   int32[B, S]   stream index of the token in each slot; -1 marks an empty slot
    pos   int32[B, S]   position of that token (for ALiBi / T5 biases of the keys)

S is the whole length for a global layer and min(sliding_window, length) for a local one. A token of
stream index i lives in slot i % S: for a global layer that is slot i, for a local layer a ring buffer
whose memory stays bounded however long the generation. Masks come from `idx` alone, so slot order
never matters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lecture3.config import ModelConfig
from lecture3.layers.common import DTYPES


def cache_slots(cfg: ModelConfig, layer: int, length: int) -> int:
    """S of one layer's cache for sequences of `length` tokens: a local layer keeps only its window."""
    window = cfg.window(layer)
    return length if window is None else min(window, length)


def init_layer_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """An empty cache of one layer: zero keys and values, every slot marked empty (idx = -1)."""
    return {
        "k": jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
        "v": jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
        "idx": jnp.full((batch, slots), -1, jnp.int32),
        "pos": jnp.zeros((batch, slots), jnp.int32),
    }


def init_cache(cfg: ModelConfig, batch: int, length: int) -> tuple:
    """The empty cache `Transformer` takes for sequences of up to `length` tokens.

    Without `scan_layers`: a tuple of one layer cache per layer. With it: a tuple over the slots of
    `layer_pattern` of layer caches stacked along a leading group axis (nn.scan's xs).
    """
    dt = DTYPES[cfg.dtype]
    kv, h = cfg.resolved_n_kv_heads, cfg.resolved_head_dim
    if not cfg.scan_layers:
        return tuple(init_layer_cache(batch, cache_slots(cfg, i, length), kv, h, dt)
                     for i in range(cfg.n_layers))
    groups = cfg.n_layers // len(cfg.layer_pattern)
    return tuple(
        jax.tree.map(lambda a: jnp.broadcast_to(a, (groups, *a.shape)),
                     init_layer_cache(batch, cache_slots(cfg, i, length), kv, h, dt))
        for i in range(len(cfg.layer_pattern)))


def cache_bytes(cache) -> int:
    """Measured bytes of the keys and values in a cache tree (the idx / pos bookkeeping excluded)."""
    total = 0
    for layer in jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, dict) and "k" in x):
        total += layer["k"].nbytes + layer["v"].nbytes
    return total


def _write(cache: dict, k: jax.Array, v: jax.Array, q_idx: jax.Array, positions: jax.Array,
           keep: jax.Array) -> dict:
    """Scatter the new tokens with `keep` into their slots idx % S; the others are dropped."""
    b, s = cache["idx"].shape
    slot = jnp.where(keep, q_idx % s, s)  # s is out of bounds: mode="drop" skips it
    rows = jnp.arange(b)[:, None]

    def put(old, new):
        return old.at[rows, slot].set(new.astype(old.dtype), mode="drop")

    return {"k": put(cache["k"], k), "v": put(cache["v"], v), "idx": put(cache["idx"], q_idx),
            "pos": put(cache["pos"], positions)}


def update_cache(cache: dict, k: jax.Array, v: jax.Array, q_idx: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None):
    """Add the new keys/values of one layer; return (cache, k_all, v_all, k_idx, k_pos, k_seg).

    k, v: [B, T, K, H] of the tokens at stream indices q_idx int32[B, T] (negative = padding, never
    stored). One token (T = 1, a decode step): write it, then attend over the S slots; the slot it
    overwrites held the token S places back, already outside any window of S. Several tokens (prefill):
    attend over the old slots concatenated with all T fresh keys, so a prompt longer than a local
    layer's ring still sees its whole window inside the prompt; then keep the newest S of them.
    Cached decoding treats each row as one document: segment ids are not stored (k_seg is None).
    """
    del segment_ids
    if k.shape[1] == 1:
        cache = _write(cache, k, v, q_idx, positions, q_idx >= 0)
        return cache, cache["k"], cache["v"], cache["idx"], cache["pos"], None
    s = cache["idx"].shape[1]
    k_all = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)  # [B, S + T, K, H]
    v_all = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
    k_idx = jnp.concatenate([cache["idx"], q_idx], axis=1)  # [B, S + T]
    k_pos = jnp.concatenate([cache["pos"], positions], axis=1)
    newest = jnp.max(k_idx, axis=1, keepdims=True)  # [B, 1]
    # Only the newest S indices survive, and those fall in distinct slots i % S.
    keep = (q_idx >= 0) & (q_idx > newest - s)
    return _write(cache, k, v, q_idx, positions, keep), k_all, v_all, k_idx, k_pos, None
