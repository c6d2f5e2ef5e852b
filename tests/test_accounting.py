"""Accounting: parameter counts against the real params tree, FLOPs against a hand count and XLA's cost
analysis, KV-cache bytes against the head and window arithmetic."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import ModelConfig, Transformer, accounting, presets
from lecture3.layers.attention import attention_mask

BASE = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)

GRID = {
    "default": {},
    "layernorm_bias": dict(norm="layernorm", norm_bias=True),
    "layernorm_no_bias": dict(norm="layernorm"),
    "no_norm_scale": dict(norm_scale=False),
    "no_norm": dict(norm="none"),
    "plain_gelu": dict(activation="gelu"),
    "gated_explicit_dff": dict(activation="geglu", d_ff=48),
    "untied": dict(tie_embeddings=False),
    "learned_positions": dict(position="learned"),
    "sinusoidal": dict(position="sinusoidal"),
    "relative_bias": dict(position="relative", relative_buckets=8),
    "alibi": dict(position="alibi"),
    "qk_norm_per_head": dict(qk_norm="per_head"),
    "qk_norm_full_layernorm_bias": dict(qk_norm="full", norm="layernorm", norm_bias=True, n_kv_heads=2),
    "gqa": dict(n_kv_heads=2),
    "mqa_decoupled_head_dim": dict(n_kv_heads=1, head_dim=12),
    "all_biases": dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True, norm="layernorm", norm_bias=True),
    "gated_mlp_bias": dict(mlp_bias=True),
    "post": dict(norm_position="post"),
    "sandwich": dict(norm_position="sandwich"),
    "post_branch": dict(norm_position="post_branch"),
    "parallel_shared": dict(block="parallel"),
    "parallel_separate": dict(block="parallel", parallel_norm="separate", norm="layernorm", norm_bias=True),
    "local_global": dict(layer_pattern=("local", "global"), sliding_window=4),
}


SCANNED = ["default", "qk_norm_full_layernorm_bias", "relative_bias", "sandwich", "parallel_separate",
           "local_global"]


def init_tree(cfg):
    """The params tree `Transformer(cfg).init` returns, LogicallyPartitioned boxes included, traced by
    jax.eval_shape: the same function as a real init, without compiling it (seconds each on a busy CPU)."""
    def init(rng):
        return Transformer(cfg).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return jax.eval_shape(init, jax.random.key(0))


@pytest.mark.parametrize("name,scan", [(n, False) for n in GRID] + [(n, True) for n in SCANNED],
                         ids=[f"{n}-loop" for n in GRID] + [f"{n}-scan" for n in SCANNED])
def test_param_counts_match_the_init_tree(name, scan):
    cfg = BASE.replace(scan_layers=scan, **GRID[name])
    assert accounting.count_params(init_tree(cfg)) == accounting.param_counts(cfg)["total"]


@pytest.mark.parametrize("name", ["default", "all_biases", "qk_norm_full_layernorm_bias", "parallel_separate",
                                  "sandwich", "relative_bias", "untied", "learned_positions"])
def test_components_match_the_subtrees(name):
    """Each component equals the scalars under the matching keys of the (unscanned) tree."""
    cfg = BASE.replace(**GRID[name])
    tree, p = init_tree(cfg), accounting.param_counts(cfg)
    layers = [tree[f"layer_{i}"] for i in range(cfg.n_layers)]
    count = accounting.count_params
    assert count(tree["embed"]) == p["embedding"]
    assert count(tree.get("pos_embed", {})) + count(tree.get("rel_bias", {})) == p["position"]
    assert count(tree.get("head", {})) == p["head"]
    assert sum(count(layer["attn"]) for layer in layers) == p["attention"]
    assert sum(count(layer["mlp"]) for layer in layers) == p["mlp"]
    norms = [count({k: v for k, v in layer.items() if k not in ("attn", "mlp")}) for layer in layers]
    assert norms == [p["norms_per_layer"]] * cfg.n_layers
    assert sum(norms) + count(tree.get("final_norm", {})) == p["norms"]
    assert p["layer"] == count(layers[0]) and p["final_norm"] == count(tree.get("final_norm", {}))
    assert p["non_embedding"] == p["total"] - p["embedding"] - p["position"] - p["head"]


def test_count_params_of_a_real_boxed_tree():
    """Arrays in LogicallyPartitioned boxes, as a real init returns them (here scanned: a leading layer
    axis), are unboxed and counted like the abstract tree."""
    cfg = BASE.replace(scan_layers=True, qk_norm="full", tie_embeddings=False)
    real = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init_tree(cfg))  # the boxes are kept
    assert any(isinstance(x, nn.LogicallyPartitioned) for x in jax.tree.leaves(real, is_leaf=_is_box))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nn.unbox(real)))
    assert accounting.count_params(real) == accounting.count_params(nn.unbox(real))
    # embed + head 2*50*32; per layer q/k/v/o 4*32*32, qk-norm 2*32, SwiGLU 3*32*128, norms 2*32; final 32
    assert accounting.count_params(real) == accounting.param_counts(cfg)["total"] == 36_256


def _is_box(x):
    return isinstance(x, nn.LogicallyPartitioned)


def test_param_counts_by_hand():
    """GPT-2 124M, component by component (d 768, 12 layers, V 50257, 1024 positions, tied)."""
    p = accounting.param_counts(presets.get("gpt2", "124m"))
    d = 768
    assert p["embedding"] == 50257 * d and p["position"] == 1024 * d and p["head"] == 0
    assert p["attention_per_layer"] == 4 * d * d + 3 * d + d
    assert p["mlp_per_layer"] == 2 * d * 4 * d + 4 * d + d
    assert p["norms_per_layer"] == 2 * 2 * d and p["final_norm"] == 2 * d
    assert p["total"] == 124_439_808


def test_flops_matmul_part_by_hand():
    # d 64, N 4, K 2, H 16, F 192 (SwiGLU), V 259, L 2
    cfg = ModelConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192)
    f = accounting.flops_per_token(cfg, seq_len=128)
    # per layer: q 64*64 + k, v 2*64*32 + o 64*64 = 12,288; mlp 3*64*192 = 36,864; head 64*259 = 16,576
    assert f["matmul_params"] == 2 * (12_288 + 36_864) + 16_576 == 114_880
    assert f["forward_matmul"] == 2 * 114_880
    assert f["forward_attention"] == 2 * 4 * 4 * 16 * 128  # layers * (qk + pv) * N * H * keys
    assert f["forward"] == f["forward_matmul"] + f["forward_attention"]
    assert f["training"] == 3 * f["forward"] == f["training_matmul"] + f["training_attention"]
    # PaLM's appendix formula 6N + 12 L H Q T, with N the matmul parameters
    assert f["training"] == 6 * 114_880 + 12 * 2 * 4 * 16 * 128


@pytest.mark.parametrize("window", [None, 1, 7, 16, 40])
def test_attended_keys_match_the_model_mask(window):
    """causal=True counts exactly the keys the model's mask lets through; causal=False the dense min(T, w)."""
    t = 32
    idx = jnp.arange(t)[None]
    visible = np.asarray(attention_mask(idx, idx, window)).sum() / t
    assert accounting.attended_keys(t, window, causal=True) == pytest.approx(visible)
    assert accounting.attended_keys(t, window) == min(t, window or t)
    assert accounting.attended_keys(t, None, causal=True) == (t + 1) / 2


def test_local_layers_charge_their_window():
    cfg = presets.get("gemma2", "tiny")  # 4 layers: local (window 16), global, local, global
    n, h, t = cfg.n_heads, cfg.resolved_head_dim, 100
    f = accounting.flops_per_token(cfg, t)
    assert f["forward_attention"] == 4 * n * h * (2 * 16 + 2 * t)
    dense = accounting.flops_per_token(cfg.replace(sliding_window=None, layer_pattern=("global",)), t)
    assert f["forward_matmul"] == dense["forward_matmul"]
    assert f["forward_attention"] < dense["forward_attention"]


@pytest.mark.slow
def test_forward_flops_agree_with_xla_cost_analysis():
    """XLA counts every op of the compiled forward (matmuls, softmax, norms, ...); ours only the matmuls and
    attention products, the dense T x T that the masked kernel computes (causal=False)."""
    cfg = ModelConfig(vocab_size=259, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    t = 128
    tokens = jnp.zeros((1, t), jnp.int32)
    params = jax.eval_shape(lambda r: Transformer(cfg).init(r, tokens), jax.random.key(0))["params"]
    compiled = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x).logits).lower(params, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost is not None and "flops" in cost, f"no cost analysis on {jax.default_backend()}: {cost}"
    ratio = cost["flops"] / (t * accounting.flops_per_token(cfg, t)["forward"])
    assert 0.95 <= ratio <= 1.25, ratio  # measured about 1.015: the rest is element-wise work


def test_kv_cache_bytes_scale_with_kv_heads():
    mha = ModelConfig(d_model=64, n_layers=3, n_heads=8)
    per = {k: accounting.kv_cache_bytes_per_token(mha.replace(n_kv_heads=k)) for k in (8, 4, 1)}
    assert per[8] == 3 * 2 * 8 * 8 * 4  # layers * (k, v) * K * H * float32
    assert per[8] == 2 * per[4] == 8 * per[1]
    assert accounting.kv_cache_bytes_per_token(mha, dtype_bytes=2) == per[8] // 2
    assert accounting.kv_cache_bytes_per_token(mha.replace(dtype="bfloat16")) == per[8] // 2
    assert accounting.kv_cache_bytes(mha, batch=3, context=10) == 3 * 10 * per[8]
    # Llama-3-8B in bf16: the often-quoted 128 KiB per token
    assert accounting.kv_cache_bytes_per_token(presets.get("llama3", "8b"), dtype_bytes=2) == 128 * 1024


def test_kv_cache_bytes_with_sliding_windows():
    cfg = presets.get("gemma2", "tiny")  # local (16), global, local, global; K 2, H 32
    slot = 2 * 2 * 32 * 4
    assert accounting.kv_cache_bytes_per_token(cfg) == 2 * slot  # only the two global layers grow
    assert accounting.kv_cache_bytes(cfg, batch=3, context=100) == 3 * slot * (2 * 100 + 2 * 16)
    assert accounting.kv_cache_bytes(cfg, batch=1, context=10) == slot * 4 * 10  # below the window
    mistral = presets.get("mistral", "tiny")  # every layer local: the cache stops growing at the window
    assert accounting.kv_cache_bytes_per_token(mistral) == 0
    assert accounting.kv_cache_bytes(mistral, 1, 1000) == accounting.kv_cache_bytes(mistral, 1, 16) > 0


def test_summary_names_components_and_figures():
    text = accounting.summary(presets.get("llama3", "8b"), 8192)
    assert "8,030,261,248" in text and "attention" in text and "mlp" in text and "head" in text
    assert "FLOPs/token at seq_len 8192" in text and "KV cache" in text
    assert "position" not in text  # zero components are left out
