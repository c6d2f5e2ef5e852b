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
from lecture3.layers import attention_ops as ops
from lecture3.layers import positions as pos
from lecture3.layers.attention_ops import NEG_INF, attention_core, attention_mask, dot_product_attention, entropy  # noqa: F401
from lecture3.layers.common import DTYPES, Inputs, constrain, dense, dropout, normal, param
from lecture3.layers.norms import NORMS


def _vector_norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))


class Attention(nn.Module):
    """Self-attention of one layer. `window` is this layer's sliding window (None = global). Returns
    (output, new cache, captured) with the `capture` names of `lecture3.capture` this layer produces."""

    cfg: ModelConfig
    window: int | None = None
    capture: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, inputs: Inputs, cache: dict | None = None,
                 deterministic: bool = True) -> tuple[jax.Array, dict | None, dict]:
        cfg = self.cfg
        q_idx, positions, segment_ids, rel_table = inputs.q_idx, inputs.positions, inputs.segment_ids, inputs.rel_table
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
        q_seg, k_seg = (segment_ids, k_seg) if cfg.document_mask else (None, None)
        bias_fn = None
        if cfg.position == "alibi":
            bias_fn = lambda qp, kp: pos.alibi_bias(qp, kp, n)  # noqa: E731
        elif cfg.position == "relative":
            bias_fn = lambda qp, kp: pos.t5_bias(qp, kp, rel_table, cfg.relative_max_distance)  # noqa: E731
        scale = cfg.query_scale if cfg.query_scale is not None else h ** -0.5
        cap = cfg.attn_logit_softcap
        drop = None if cfg.attn_dropout is None or deterministic else (
            lambda p: dropout(self, p, cfg.attn_dropout, deterministic))
        # the probabilities themselves (capture) exist only in the dense product, whatever attention_impl
        needs_probs = bool({"attn_probs", "attn_entropy"} & set(self.capture))
        impl = "dense" if needs_probs else cfg.attention_impl
        probs = None
        blocked = cache is None and self.window is not None and q.shape[1] > 2 * self.window
        if blocked and impl != "cudnn" and not needs_probs:
            out, head_max = ops.local_attention(q, k, v, q_idx, self.window, q_seg, positions, bias_fn,
                                                scale, cap, drop)
        elif impl == "chunked":
            out, head_max = ops.chunked_attention(q, k, v, q_idx, k_idx, self.window, q_seg, k_seg, positions,
                                                  k_pos, bias_fn, scale, cap, cfg.attention_chunk)
        elif impl == "cudnn":
            out, head_max = self.fused(q, k, v, q_idx, k_idx, q_seg, k_seg, bias_fn, positions, k_pos, scale,
                                       in_order=cache is None)
        else:
            mask = attention_mask(q_idx, k_idx, self.window, q_seg, k_seg)
            bias = None if bias_fn is None else bias_fn(positions, k_pos)
            out, probs, head_max = attention_core(q, k, v, mask, bias, scale, cap, drop)
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

    def fused(self, q, k, v, q_idx, k_idx, q_seg, k_seg, bias_fn, q_pos, k_pos, scale, in_order: bool):
        """attention_impl='cudnn'. `in_order` (no cache: q_idx = k_idx counting up by one) hands causality and
        the window to JAX, leaving a mask only for documents; the max logit is computed only when captured."""
        implementation = ops.fused_implementation(self.cfg.dtype)
        if in_order:
            mask = None if q_seg is None else q_seg[:, :, None] == k_seg[:, None, :]
        else:
            mask = attention_mask(q_idx, k_idx, self.window, q_seg, k_seg)
        bias = None if bias_fn is None else bias_fn(q_pos, k_pos)
        return ops.fused_attention(q, k, v, mask, bias, scale, causal=in_order,
                                   window=self.window if in_order else None, implementation=implementation,
                                   with_max="attn_logit_max" in self.capture)

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
