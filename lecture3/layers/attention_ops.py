"""The attention maths as pure functions: masks from stream indices, and three ways to compute the same
softmax attention, chosen by `ModelConfig.attention_impl`:

  dense     `attention_core`: all T x S logits at once (the reference every other way is tested against);
            a local layer in training uses `local_attention`, the same core over blocks of its window,
            so its cost grows with T x window, not T x T
  chunked   `chunked_attention`: query chunks x key chunks with an online softmax (FlashAttention's
            recurrence in pure JAX, differentiable); memory O(T x chunk) in the forward and the backward
            (each query chunk is recomputed), chunks that the mask hides entirely are skipped
  cudnn     `fused_attention`: `jax.nn.dot_product_attention`, cuDNN's fused kernel on a GPU (float16 /
            bfloat16 only: `fused_implementation`) and its XLA path elsewhere, causal and windowed by JAX's
            own arguments in training; it cannot express a soft-cap, dropout or a learned bias (the config
            says so), and it reads the max logit only when a capture asks for it
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lecture3.config import ConfigError
from lecture3.layers.common import softcap

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


@jax.custom_jvp
def softmax_given_max(x: jax.Array, row_max: jax.Array) -> jax.Array:
    """softmax over the last axis of x, given its row max (keepdims; only a shift: no gradient flows to
    it). The derivative is the softmax's own, y * (dx - sum(y * dx)): autodiff through the division
    (what `jax.nn.softmax` does unless `jax_softmax_custom_jvp` is set) costs more passes in the backward."""
    e = jnp.exp(x - row_max)
    return e / jnp.sum(e, axis=-1, keepdims=True)


@softmax_given_max.defjvp
def _softmax_given_max_jvp(primals, tangents):
    x, row_max = primals
    dx, _ = tangents
    y = softmax_given_max(x, row_max)
    return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


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
    plain = cap is None and bias is None
    if not plain:
        head_max = jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=(0, 3, 4)).reshape(n)  # [N]
    logits = softcap(logits, cap)
    if bias is not None:
        logits = logits + bias.reshape(bias.shape[0], kv, n // kv, t, -1)
    logits = jnp.where(allowed, logits, NEG_INF)
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # [B, K, G, T, 1]
    if plain:  # the softmax's own row max is the head max: one pass over the logits less
        head_max = jnp.max(row_max, axis=(0, 3, 4)).reshape(n)
        head_max = jnp.where(head_max <= NEG_INF, -jnp.inf, head_max)  # a head that sees no key at all
    probs = jnp.where(allowed, softmax_given_max(logits, jax.lax.stop_gradient(row_max)), 0.0)
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


BiasFn = Callable[[jax.Array, jax.Array], jax.Array]  # (q positions [B, T], k positions [B, S]) -> [B, N, T, S]


def _blocks(x: jax.Array, size: int, fill) -> jax.Array:
    """[B, T, ...] -> [B, T // size, size, ...], padding T up to a multiple of `size` with `fill`."""
    pad = -x.shape[1] % size
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:])


def _with_previous(x: jax.Array, fill) -> jax.Array:
    """[B, nb, C, ...] -> [B, nb, 2C, ...]: each block preceded by the block before it (`fill` for the first)."""
    prev = jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)[:, :-1]
    return jnp.concatenate([prev, x], axis=2)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_idx: jax.Array, window: int,
                    segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                    bias_fn: BiasFn | None = None, scale: float = 1.0, cap: float | None = None,
                    dropout_fn=None) -> tuple[jax.Array, jax.Array]:
    """A sliding-window layer over its own tokens (no cache), in blocks of `window` queries: each block
    attends to itself and the block before, 2 x window keys, which hold every key its queries may see
    when q_idx counts up by one along each row (as in training and scoring). The mask, bias, cap and
    NaN rules are `attention_core`'s, so the result equals the dense T x T product; the cost is
    T x 2 window. q: [B, T, N, H]; k, v: [B, T, K, H] -> (out [B, T, N, H], per-head max logit [N])."""
    b, t, n, h = q.shape
    nb = -(-t // window)
    flat = lambda x: x.reshape(b * nb, *x.shape[2:])  # noqa: E731  [B, nb, C, ...] -> [B * nb, C, ...]
    qi = _blocks(q_idx, window, -1)
    ki = _with_previous(qi, -1)  # -1: an empty slot, masked
    qs = ks = None
    if segment_ids is not None:
        qs = _blocks(segment_ids, window, -1)
        ks = _with_previous(qs, -1)
    mask = attention_mask(flat(qi), flat(ki), window, None if qs is None else flat(qs),
                          None if ks is None else flat(ks))
    bias = None
    if bias_fn is not None:
        qp = _blocks(positions, window, 0)
        bias = bias_fn(flat(qp), flat(_with_previous(qp, 0)))
    kb, vb = (flat(_with_previous(_blocks(x, window, 0), 0)) for x in (k, v))
    out, _, head_max = attention_core(flat(_blocks(q, window, 0)), kb, vb, mask, bias, scale, cap, dropout_fn)
    return out.reshape(b, nb * window, n, h)[:, :t], head_max


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_idx: jax.Array, k_idx: jax.Array,
                      window: int | None = None, q_seg: jax.Array | None = None, k_seg: jax.Array | None = None,
                      q_pos: jax.Array | None = None, k_pos: jax.Array | None = None,
                      bias_fn: BiasFn | None = None, scale: float = 1.0, cap: float | None = None,
                      chunk: int = 512) -> tuple[jax.Array, jax.Array]:
    """`attention_core`'s maths in chunks of `chunk` queries x `chunk` keys with an online softmax.

    For each query chunk a scan over key chunks carries the running max m, the running sum l and the
    unnormalised output; a key chunk that the mask hides from the whole query chunk (above the causal
    diagonal, outside the window, another document) is skipped. Both the key-chunk step and the whole
    query chunk are rematerialised in the backward pass, so memory stays O(T x chunk) either way; the
    price is one more forward of the attention in the backward. Logits, softmax and the output sum are
    float32. q: [B, T, N, H]; k, v: [B, S, K, H] -> (out [B, T, N, H], per-head max logit [N]).
    """
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    cq, ck = min(chunk, t), min(chunk, s)
    chunks = lambda x, c, fill: jnp.moveaxis(_blocks(x, c, fill), 1, 0)  # noqa: E731  -> [n, B, c, ...]
    finite = jnp.isfinite(v)
    bad_slot = chunks(~jnp.all(finite, axis=-1), ck, False)  # [nk, B, ck, K]
    keys = (chunks(k, ck, 0), chunks(jnp.where(finite, v, 0), ck, 0), chunks(k_idx, ck, -1),
            None if k_seg is None else chunks(k_seg, ck, -1), None if k_pos is None else chunks(k_pos, ck, 0),
            bad_slot)
    queries = (chunks(q, cq, 0), chunks(q_idx, cq, -1), None if q_seg is None else chunks(q_seg, cq, -1),
               None if q_pos is None else chunks(q_pos, cq, 0))

    def key_step(carry, ys, qb, qi, qs, qp):
        kb, vb, ki, ks, kp, bad_k = ys
        allowed = attention_mask(qi, ki, window, qs, ks)  # [B, cq, ck]

        def attend(carry):
            m, l, acc, head_max, sees_bad = carry
            qg = qb.reshape(b, cq, kv, g, h)
            logits = jnp.einsum("btkgh,bskh->bkgts", qg, kb, preferred_element_type=jnp.float32) * scale
            ok = allowed[:, None, None]
            head_max = jnp.maximum(head_max, jnp.max(jnp.where(ok, logits, -jnp.inf), axis=(0, 3, 4)))
            logits = softcap(logits, cap)
            if bias_fn is not None:
                logits = logits + bias_fn(qp, kp).reshape(b, kv, g, cq, ck)
            logits = jnp.where(ok, logits, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            p = jnp.where(ok, jnp.exp(logits - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("bkgts,bskh->bkgth", p.astype(vb.dtype), vb,
                                                     preferred_element_type=jnp.float32)
            bad = jnp.any(allowed[:, None] & jnp.moveaxis(bad_k, 2, 1)[:, :, None, :], axis=-1)  # [B, K, cq]
            return m_new, l, acc, head_max, sees_bad | bad[:, :, None]

        return jax.lax.cond(jnp.any(allowed), attend, lambda c: c, carry), None

    def query_chunk(_, xs):
        qb, qi, qs, qp = xs
        carry = (jnp.full((b, kv, g, cq), NEG_INF, jnp.float32), jnp.zeros((b, kv, g, cq), jnp.float32),
                 jnp.zeros((b, kv, g, cq, h), jnp.float32), jnp.full((kv, g), -jnp.inf, jnp.float32),
                 jnp.zeros((b, kv, 1, cq), bool))
        step = jax.checkpoint(lambda c, ys: key_step(c, ys, qb, qi, qs, qp))
        (_, l, acc, head_max, sees_bad), _ = jax.lax.scan(step, carry, keys)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # a row that sees no key: acc = 0
        out = jnp.where(sees_bad[..., None], jnp.nan, out)
        return None, (out.astype(v.dtype), head_max)

    _, (out, head_max) = jax.lax.scan(jax.checkpoint(query_chunk), None, queries)  # [nq, B, K, G, cq, H]
    out = out.transpose(0, 1, 4, 2, 3, 5).reshape(-1, b, cq, n, h)  # [nq, B, cq, N, H] (n = k * G + g)
    out = jnp.moveaxis(out, 0, 1).reshape(b, -1, n, h)[:, :t]
    return out, jnp.max(head_max, axis=0).reshape(n)


FUSED_DTYPES = ("bfloat16", "float16")  # what cuDNN's fused attention takes (jax's cudnn check_layout)


def fused_implementation(dtype: str, backend: str | None = None) -> str:
    """`jax.nn.dot_product_attention`'s `implementation=` for attention_impl='cudnn': "cudnn" (the fused
    kernel) on a GPU, "xla" elsewhere, which computes any dtype. The kernel takes float16 / bfloat16 only
    (jax raises inside `jit` otherwise), so a model computing `dtype` on a GPU that cannot is a ConfigError.
    `backend`: default `jax.default_backend()`."""
    if (jax.default_backend() if backend is None else backend) != "gpu":
        return "xla"
    if dtype not in FUSED_DTYPES:
        raise ConfigError(f"ModelConfig.attention_impl='cudnn' is invalid with dtype={dtype!r} on a GPU: "
                          "cuDNN's fused attention computes float16 / bfloat16 only; set dtype='bfloat16', "
                          "or attention_impl='dense' or 'chunked' for float32")
    return "cudnn"


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                    bias: jax.Array | None = None, scale: float = 1.0, causal: bool = False,
                    window: int | None = None, implementation: str = "xla",
                    with_max: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """`jax.nn.dot_product_attention` (`implementation`: `fused_implementation`'s) with `attention_core`'s
    maths. The keys a query sees: `mask` (bool[B, T, S], or None for all) and, with `causal`, none after
    it and (with `window`) only the last `window`, by place in the arrays (training: q_idx = k_idx counting
    up by one); these two reach JAX as `is_causal` / `local_window_size`, which cuDNN computes without a
    T x S mask. The bias reaches cuDNN in q's dtype (the kernel's), XLA's float32 logits as it is.
    A fully masked row of `mask` (without `causal`) outputs zeros, as in `attention_core`; unlike it, a NaN
    in a masked value slot is not kept from the rows that do not see it (the kernel multiplies it by 0).
    Returns (out [B, T, N, H], the per-head max logit [N] with `with_max`, else None): the fused kernel
    never forms the logits, so the max is one more q.k product outside the gradient, paid only when asked.
    """
    if window is not None and not causal:
        raise ValueError("fused_attention: window needs causal=True (JAX's local window is around the diagonal)")
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    if implementation == "cudnn" and bias is not None:
        bias = bias.astype(q.dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=None if mask is None else mask[:, None], scale=scale, is_causal=causal,
        local_window_size=None if window is None else (window - 1, 0), implementation=implementation)
    if mask is not None and not causal:
        out = jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0)
    if not with_max:
        return out, None
    allowed = jnp.ones((b, t, s), bool) if mask is None else mask
    if causal:
        qi, ki = jnp.arange(t)[:, None], jnp.arange(s)[None]
        allowed = allowed & (ki <= qi) & (True if window is None else qi - ki < window)
    qg = jax.lax.stop_gradient(q).reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, jax.lax.stop_gradient(k), preferred_element_type=jnp.float32)
    head_max = jnp.max(jnp.where(allowed[:, None, None], logits * scale, -jnp.inf), axis=(0, 3, 4)).reshape(n)
    return out, head_max
