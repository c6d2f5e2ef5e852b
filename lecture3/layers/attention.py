"""Attention: MHA, MQA and GQA from one einsum over kv groups; masks; qk-norm; soft-cap; KV cache.

n_kv_heads = n_heads is MHA, 1 is MQA, a divisor in between is GQA: query head n = k * G + g reads kv head k.
Masks are built from integer *indices* (place in the stream: causality, windows) and optional segment
ids (packed documents); position encodings use *positions*, which may restart per document.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lecture3.config import ModelConfig
from lecture3.layers import positions as pos
from lecture3.layers.common import DTYPES, constrain, dense, dropout, normal, param, softcap
from lecture3.layers.norms import NORMS

NEG_INF = -1e30  # large but finite: no NaN from a fully masked row (its probabilities are then zeroed)


def attention_mask(q_idx: jax.Array, k_idx: jax.Array, window: int | None = None,
                   q_seg: jax.Array | None = None, k_seg: jax.Array | None = None) -> jax.Array:
    """bool[B, T, S]: causal (k <= q), within the window (q - k < window) and the same segment.

    q_idx: int[B, T], k_idx: int[B, S]. Negative k_idx marks an empty cache slot.
    """
    q, k = q_idx[:, :, None], k_idx[:, None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= q - k < window
    if q_seg is not None and k_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          bias: jax.Array | None = None, scale: float = 1.0, cap: float | None = None,
                          dropout_fn=None) -> tuple[jax.Array, jax.Array]:
    """q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool[B, T, S]; bias: [B, N, T, S] -> (out [B, T, N, H],
    the largest scale * q.k over allowed keys, before the cap and the bias). See `attention_core`."""
    out, _, head_max = attention_core(q, k, v, mask, bias, scale, cap, dropout_fn)
    return out, jnp.max(head_max)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                   bias: jax.Array | None = None, scale: float = 1.0, cap: float | None = None,
                   dropout_fn=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool[B, T, S]; bias: [B, N, T, S].

    The softmax sees cap * tanh(scale * q.k / cap) + bias: the soft-cap bounds the content logit and a
    position bias (ALiBi, T5) is added after it, as FlashAttention-2 orders softcap and ALiBi, so ALiBi's
    distance penalty never saturates at the cap (a positive T5 bias can take the sum past the cap).
    Returns the output [B, T, N, H], the probabilities float32[B, K, G, T, S] (before dropout) and each
    head's largest scale * q.k over allowed keys, float32[N], before the cap and the bias (a stability
    signal that a cap would pin at its value). Logits and softmax are float32.
    A masked key contributes exactly nothing: its probability is 0 and a NaN/inf in its value slot
    cannot reach the rows that do not see it (0 * NaN is NaN), while a row that sees one still gets NaN.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    # heads-major layouts, so both matmuls are plain batched [T, H] x [H, S] products over (B, K, G)
    qg = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    logits = jnp.einsum("bkgth,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    allowed = mask[:, None, None]  # [B, 1, 1, T, S]
    head_max = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=(0, 3, 4)).reshape(n)  # [N]
    logits = softcap(logits, cap)
    if bias is not None:
        logits = logits + bias.reshape(bias.shape[0], kv, n // kv, t, -1)
    logits = jnp.where(allowed, logits, NEG_INF)
    probs = jnp.where(allowed, jax.nn.softmax(logits, axis=-1), 0.0)
    weights = probs if dropout_fn is None else dropout_fn(probs)
    finite = jnp.isfinite(v)
    out = jnp.einsum("bkgts,bksh->bkgth", weights.astype(v.dtype), jnp.where(finite, v, 0))  # [B, K, G, T, H]
    bad_slot = ~jnp.all(finite, axis=-1)[:, :, None, None, :]  # [B, K, 1, 1, S]
    sees_bad = jnp.any(allowed & bad_slot, axis=-1, keepdims=True)  # [B, K, 1, T, 1]
    out = jnp.where(sees_bad, jnp.asarray(jnp.nan, out.dtype), out)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h), probs, head_max


def entropy(probs: jax.Array) -> jax.Array:
    """Entropy in nats over the last axis, with 0 log 0 = 0."""
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)


def _vector_norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))


class Attention(nn.Module):
    """Self-attention of one layer. `window` is this layer's sliding window (None = global). Returns
    (output, new cache, captured) with the `capture` names of `lecture3.capture` this layer produces."""

    cfg: ModelConfig
    window: int | None = None
    capture: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, q_idx: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 rel_table: jax.Array | None = None, cache: dict | None = None,
                 deterministic: bool = True) -> tuple[jax.Array, dict | None, dict]:
        cfg = self.cfg
        n, kv, h, d = cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim, cfg.d_model
        dt = DTYPES[cfg.dtype]
        init = normal(cfg.init_std)

        def proj(name, heads, head_axis):
            w = param(self, name, (d, heads, h), ("embed", head_axis, "head_dim"), init, cfg.param_dtype)
            y = dense(x.astype(dt), w.astype(dt))  # [B, T, heads, H]
            if cfg.qkv_bias:
                y = y + param(self, name + "_bias", (heads, h), (head_axis, "head_dim"),
                              nn.initializers.zeros, cfg.param_dtype).astype(dt)
            return y

        q = proj("q", n, "heads")  # [B, T, N, H]
        k = proj("k", kv, "kv_heads")  # [B, T, K, H]
        v = proj("v", kv, "kv_heads")
        if cfg.qk_norm is not None:
            q, k = self.qk_norm(q, "q_norm"), self.qk_norm(k, "k_norm")
        if cfg.position == "rope":
            inv_freq = pos.rope_frequencies(int(h * cfg.rope_fraction), cfg.rope_theta, cfg.rope_scaling)
            q = pos.apply_rope(q, positions, inv_freq, cfg.rope_layout)
            k = pos.apply_rope(k, positions, inv_freq, cfg.rope_layout)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        captured = {}  # q and k as they enter the dot product (this step's keys only, when decoding)
        if "q_norm" in self.capture:
            captured["q_norm"] = _vector_norm(q)  # [B, T, N]
        if "k_norm" in self.capture:
            captured["k_norm"] = _vector_norm(k)  # [B, T, K]

        k_idx, k_pos, k_seg = q_idx, positions, segment_ids
        if cache is not None:
            from lecture3.layers.kv_cache import update_cache  # decoding only

            cache, k, v, k_idx, k_pos, k_seg = update_cache(cache, k, v, q_idx, positions, segment_ids)
        mask = attention_mask(q_idx, k_idx, self.window, segment_ids if cfg.document_mask else None,
                              k_seg if cfg.document_mask else None)
        bias = None
        if cfg.position == "alibi":
            bias = pos.alibi_bias(positions, k_pos, n)
        elif cfg.position == "relative":
            bias = pos.t5_bias(positions, k_pos, rel_table, cfg.relative_max_distance)
        scale = cfg.query_scale if cfg.query_scale is not None else h ** -0.5
        drop = None if cfg.attn_dropout is None or deterministic else (
            lambda p: dropout(self, p, cfg.attn_dropout, deterministic))
        out, probs, head_max = attention_core(q, k, v, mask, bias, scale, cfg.attn_logit_softcap, drop)
        if "attn_logit_max" in self.capture:
            captured["attn_logit_max"] = head_max
        if "attn_probs" in self.capture:
            captured["attn_probs"] = probs.reshape(probs.shape[0], n, *probs.shape[3:])  # [B, N, T, S]
        if "attn_entropy" in self.capture:
            captured["attn_entropy"] = entropy(probs).reshape(probs.shape[0], n, -1)  # [B, N, T]
        wo = param(self, "o", (n, h, d), ("heads", "head_dim", "embed"),
                   normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5), cfg.param_dtype)
        y = dense(out.astype(dt), wo.astype(dt), n_in=2)  # [B, T, D]
        if cfg.attn_out_bias:
            y = y + param(self, "o_bias", (d,), ("embed",), nn.initializers.zeros, cfg.param_dtype).astype(dt)
        return constrain(y, ("batch", "length", "embed")), cache, captured

    def qk_norm(self, x: jax.Array, name: str) -> jax.Array:
        """Norm q or k per head ([H] gain) or over the whole projection ([N*H] gain, OLMo 2)."""
        cfg = self.cfg
        b, t, heads, h = x.shape
        width = h if cfg.qk_norm == "per_head" else heads * h
        axes = ("head_dim",) if cfg.qk_norm == "per_head" else ("norm",)
        scale = param(self, name, (width,), axes, nn.initializers.ones, cfg.param_dtype) if cfg.norm_scale else None
        bias = (param(self, name + "_bias", (width,), axes, nn.initializers.zeros, cfg.param_dtype)
                if cfg.norm_bias else None)
        flat = x if cfg.qk_norm == "per_head" else x.reshape(b, t, heads * h)
        return NORMS[cfg.norm](flat, scale, bias, cfg.norm_eps).reshape(b, t, heads, h)
