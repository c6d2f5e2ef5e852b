"""Accounting from the config alone: parameters per component, FLOPs per token, KV-cache bytes.

Everything but `count_params` is plain arithmetic over a `ModelConfig` (no arrays, no tracing), so it
works for a 540B model as fast as for a tiny one. The tests hold `param_counts` to the real params tree
of `Transformer` and to published parameter counts, and `flops_per_token` to XLA's cost analysis.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from lecture3.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _norm(cfg: ModelConfig, width: int) -> int:
    """Parameters of one norm over `width` features: a gain and (LayerNorm with bias) a bias."""
    if cfg.norm == "none":
        return 0
    return width * (int(cfg.norm_scale) + int(cfg.norm_bias))


def _norms_per_layer(cfg: ModelConfig) -> int:
    """How many norms one block owns (see layers/block.py)."""
    if cfg.norm == "none":
        return 0
    if cfg.block == "parallel":
        return 1 if cfg.parallel_norm == "shared" else 2
    return 4 if cfg.norm_position == "sandwich" else 2


def _attention_matmul(cfg: ModelConfig) -> int:
    """Weights of q, k, v and o: D*N*H + 2*D*K*H + N*H*D."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim
    return d * n * h + 2 * d * k * h + n * h * d


def _mlp_matmul(cfg: ModelConfig) -> int:
    """Weights of up, (gate) and down: (2 or 3) * D * F."""
    return (3 if cfg.gated else 2) * cfg.d_model * cfg.resolved_d_ff


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of each component of `Transformer(cfg)`, computed from the config.

    Components (they sum to "total"):
      embedding   token table V*D (also the head when tied)
      position    learned table max_seq_len*D, or T5's bucket table buckets*N; 0 otherwise
      attention   all layers: q/k/v/o weights, q/k/v and o biases, and the qk-norm gains (and biases)
      mlp         all layers: up/gate/down weights and their biases
      norms       all layers' block norms plus the final norm
      head        D*V when untied, 0 when tied
    Per-layer details: attention_per_layer, mlp_per_layer, norms_per_layer, layer (one whole block),
    final_norm; and non_embedding = total - embedding - position - head (Kaplan et al.'s N).
    Every layer has the same parameters (a sliding window changes the mask, not the weights).
    """
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim
    f = cfg.resolved_d_ff
    attn = _attention_matmul(cfg)
    if cfg.qkv_bias:
        attn += n * h + 2 * k * h
    if cfg.attn_out_bias:
        attn += d
    if cfg.qk_norm == "per_head":  # one [H] gain (and bias) for q and one for k
        attn += 2 * _norm(cfg, h)
    elif cfg.qk_norm == "full":  # over the whole projection: [N*H] for q, [K*H] for k (OLMo 2)
        attn += _norm(cfg, n * h) + _norm(cfg, k * h)
    mlp = _mlp_matmul(cfg)
    if cfg.mlp_bias:
        mlp += (2 * f if cfg.gated else f) + d
    norms = _norms_per_layer(cfg) * _norm(cfg, d)
    final_norm = _norm(cfg, d) if cfg.has_final_norm else 0

    position = 0
    if cfg.position == "learned":
        position = cfg.max_seq_len * d
    elif cfg.position == "relative":
        position = cfg.relative_buckets * n
    counts = {
        "embedding": cfg.vocab_size * d,
        "position": position,
        "attention": cfg.n_layers * attn,
        "mlp": cfg.n_layers * mlp,
        "norms": cfg.n_layers * norms + final_norm,
        "head": 0 if cfg.tie_embeddings else d * cfg.vocab_size,
    }
    counts["total"] = sum(counts.values())
    counts.update(
        attention_per_layer=attn, mlp_per_layer=mlp, norms_per_layer=norms, layer=attn + mlp + norms,
        final_norm=final_norm,
        non_embedding=counts["total"] - counts["embedding"] - counts["position"] - counts["head"],
    )
    return counts


def count_params(params) -> int:
    """Number of scalars in a params tree: arrays, `jax.ShapeDtypeStruct`s or flax partitioning boxes."""
    leaves = jax.tree.leaves(nn.unbox(params))
    return sum(math.prod(leaf.shape) for leaf in leaves)


def attended_keys(seq_len: int, window: int | None = None, causal: bool = False) -> float:
    """Keys each query is charged for, averaged over the T = seq_len queries of a sequence.

    causal=False: min(T, window) for every query: the dense T x S product that a masked implementation
    (like lecture3's) computes, and the PaLM / Chinchilla convention. causal=True: only the keys a query
    can see, mean over i of min(i + 1, window), e.g. (T + 1) / 2 for a global layer.
    """
    w = seq_len if window is None else min(window, seq_len)
    if not causal:
        return float(w)
    # positions 0..w-1 see 1..w keys; the remaining T - w positions see w keys each
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def computed_keys(cfg: ModelConfig, seq_len: int, layer: int) -> float:
    """Keys per query that lecture3's attention really multiplies in a training forward of `seq_len`
    tokens (masked keys included), by `cfg.attention_impl` and the layer's window:

      local layer, T > 2 x window (dense, chunked)  blocks of `window` queries x 2 window keys: ~2 window
      chunked                                       the chunk pairs the mask does not hide entirely: for a
                                                    causal global layer nq (nq + 1) / 2 of nq^2 chunks
      otherwise (dense, cudnn)                      all T keys (cudnn's kernel skips what it can: not counted)
    """
    t, w = seq_len, cfg.window(layer)
    if cfg.attention_impl != "cudnn" and w is not None and t > 2 * w:
        return 2.0 * w * math.ceil(t / w) * w / t
    if cfg.attention_impl == "chunked":
        c = min(cfg.attention_chunk, t)
        n = math.ceil(t / c)
        reach = n if w is None else min(n, math.ceil((w - 1) / c) + 1)  # key chunks back a query chunk sees
        pairs = sum(min(i + 1, reach) for i in range(n))
        return pairs * c * c / t
    return float(t)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = False) -> dict[str, float]:
    """Model FLOPs per token of a sequence of `seq_len` tokens (one multiply-add = 2 FLOPs).

    forward_matmul    = 2 * matmul_params, where matmul_params counts every weight that multiplies an
                        activation: q/k/v/o and the MLP matrices of each layer, plus the head D*V (tied or
                        not). The embedding lookup (a gather), biases, norms, positions and element-wise ops
                        (softmax, activations, soft-caps) are not counted.
    forward_attention = sum over layers of 4 * N * H * keys_l: q.k^T and probs.v, each 2 * N * H per
                        (query, key) pair. keys_l = `attended_keys(seq_len, window_l, causal)`: a local
                        layer is charged at most its window; causal=False (the default) charges every
                        query all min(T, window) keys, as PaLM's 6N + 12 L H Q T and as a dense masked
                        kernel computes; causal=True charges only the visible keys (about half).
    training_*        = 3 * forward_*: the backward pass costs twice the forward (grads of activations
                        and of weights). Rematerialisation is not counted (these are model FLOPs, for MFU).
    computed_attention = the forward attention FLOPs the implementation really multiplies:
                        4 * N * H * `computed_keys` per layer (masked keys in its blocks included)
    """
    n, h = cfg.n_heads, cfg.resolved_head_dim
    matmul = cfg.n_layers * (_attention_matmul(cfg) + _mlp_matmul(cfg)) + cfg.d_model * cfg.vocab_size
    attention = sum(4 * n * h * attended_keys(seq_len, cfg.window(layer), causal)
                    for layer in range(cfg.n_layers))
    out = {
        "matmul_params": float(matmul),
        "forward_matmul": 2.0 * matmul,
        "forward_attention": attention,
        "forward": 2.0 * matmul + attention,
    }
    out.update(training_matmul=3 * out["forward_matmul"], training_attention=3 * attention,
               training=3 * out["forward"],
               computed_attention=sum(4 * n * h * computed_keys(cfg, seq_len, layer) for layer in range(cfg.n_layers)))
    return out


def _dtype_bytes(cfg: ModelConfig, dtype_bytes: int | None) -> int:
    return DTYPE_BYTES[cfg.dtype] if dtype_bytes is None else dtype_bytes


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int | None = None) -> int:
    """Bytes each extra token of context adds to the KV cache: 2 * K * H * bytes, summed over global layers.

    Local (sliding-window) layers are not counted: their ring buffers stop growing at the window, so past
    every window a token costs only the global layers (Mistral's all-local stack: 0). For the total at a
    given context use `kv_cache_bytes`. dtype_bytes defaults to the compute dtype's (`cfg.dtype`).
    """
    per_layer = 2 * cfg.resolved_n_kv_heads * cfg.resolved_head_dim * _dtype_bytes(cfg, dtype_bytes)
    return per_layer * sum(cfg.window(layer) is None for layer in range(cfg.n_layers))


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, dtype_bytes: int | None = None) -> int:
    """Bytes of K and V held for `batch` sequences of `context` tokens.

    A global layer holds `context` slots; a local layer holds min(context, sliding_window) slots (a ring
    buffer of the window). Each slot is 2 * K * H values of `dtype_bytes` (default: `cfg.dtype`'s).
    Only K and V are counted, not bookkeeping such as cached positions or segment ids.
    """
    per_slot = 2 * cfg.resolved_n_kv_heads * cfg.resolved_head_dim * _dtype_bytes(cfg, dtype_bytes)
    slots = sum(context if cfg.window(layer) is None else min(context, cfg.window(layer))
                for layer in range(cfg.n_layers))
    return batch * per_slot * slots


def _si(x: float, unit: str = "") -> str:
    """1.23 GFLOP with a unit; 1.23B without (a count)."""
    giga = "G" if unit else "B"
    for scale, prefix in ((1e12, "T"), (1e9, giga), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}" if unit else f"{x / scale:.2f}{prefix}"
    return f"{x:.0f} {unit}".rstrip()


def _bytes(x: float) -> str:
    for scale, prefix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}"
    return f"{x:.0f} B"


def summary(cfg: ModelConfig, seq_len: int | None = None) -> str:
    """A human table of parameters per component, FLOPs per token and KV-cache size (seq_len: max_seq_len)."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    p = param_counts(cfg)
    total = p["total"]
    rows = [(name, p[name]) for name in ("embedding", "position", "attention", "mlp", "norms", "head")]
    lines = [f"{'component':<14}{'params':>16}{'share':>9}"]
    lines += [f"{name:<14}{count:>16,}{100 * count / total:>8.1f}%" for name, count in rows if count]
    lines += [f"{'total':<14}{total:>16,}{'':>9}  ({_si(total)})",
              f"{'non-embedding':<14}{p['non_embedding']:>16,}{'':>9}  ({_si(p['non_embedding'])})",
              f"{'per layer':<14}{p['layer']:>16,}"]
    dense, causal = flops_per_token(cfg, seq_len), flops_per_token(cfg, seq_len, causal=True)
    lines += [
        f"FLOPs/token at seq_len {seq_len}: forward {_si(dense['forward'], 'FLOP')} "
        f"(matmul {_si(dense['forward_matmul'], 'FLOP')}, "
        f"attention {_si(dense['forward_attention'], 'FLOP')})",
        f"  training {_si(dense['training'], 'FLOP')} = 3 x forward "
        f"({_si(causal['training'], 'FLOP')} counting only the causally visible keys)",
        f"KV cache ({cfg.dtype}): {_bytes(kv_cache_bytes_per_token(cfg))} per token of global layers; "
        f"{_bytes(kv_cache_bytes(cfg, 1, seq_len))} for one sequence of {seq_len} tokens",
    ]
    return "\n".join(lines)
