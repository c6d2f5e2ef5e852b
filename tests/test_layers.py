"""The maths of each option against a reference: transformers / torch (float32) where one exists, numpy
formulas and hand-written matrices where not; plus the pure-function properties (RoPE is relative, caps hold,
GQA grouping, parameter parity of gated and plain MLPs)."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply_rope
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rope
from transformers.models.t5.modeling_t5 import T5Attention

from lecture3.config import ModelConfig, RopeScaling
from lecture3.layers import positions as pos
from lecture3.layers.attention import attention_mask, dot_product_attention
from lecture3.layers.mlp import ACTIVATIONS, MLP, mlp
from lecture3.layers.norms import layer_norm, rms_norm

RNG = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def t(x):
    return torch.from_numpy(np.asarray(x))


# ----------------------------------------------------------------------------------------------- RoPE


def hf_rope(rotary_emb, x, positions):
    """x: [B, T, N, H] rotated by a transformers rotary-embedding module and its apply_rotary_pos_emb."""
    cos, sin = rotary_emb(t(x), t(positions).long())
    apply = neox_apply_rope if isinstance(rotary_emb, GPTNeoXRotaryEmbedding) else llama_apply_rope
    q, _ = apply(t(x), t(x), cos, sin, unsqueeze_dim=2)
    return q.numpy()


@pytest.mark.parametrize("theta", [10_000.0, 500_000.0])
def test_rope_matches_hf_llama(theta):
    b, n, h = 2, 3, 16
    positions = RNG.integers(0, 200, size=(b, 7))
    x = randn(b, 7, n, h)
    cfg = LlamaConfig(hidden_size=n * h, num_attention_heads=n,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    ours = pos.apply_rope(jnp.asarray(x), jnp.asarray(positions), pos.rope_frequencies(h, theta))
    np.testing.assert_allclose(ours, hf_rope(LlamaRotaryEmbedding(cfg), x, positions), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("original_max,factor", [(64, 8.0), (8192, 32.0)])
def test_llama3_rope_scaling_matches_hf(original_max, factor):
    h, theta = 64, 500_000.0
    scaling = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position=original_max)
    cfg = LlamaConfig(hidden_size=2 * h, num_attention_heads=2, max_position_embeddings=4 * original_max,
                      rope_parameters={"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": original_max})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    ours = pos.rope_frequencies(h, theta, scaling)
    np.testing.assert_allclose(ours, hf_inv.numpy(), rtol=1e-6)
    # the three regimes (kept, smoothed, divided by factor) are all exercised
    plain = pos.rope_frequencies(h, theta)
    ratio = plain / ours
    assert np.any(np.isclose(ratio, 1.0)) and np.any(np.isclose(ratio, factor))
    assert np.any((ratio > 1.001) & (ratio < factor * 0.999))
    positions = RNG.integers(0, 100, size=(2, 5))
    x = randn(2, 5, 2, h)
    ours_x = pos.apply_rope(jnp.asarray(x), jnp.asarray(positions), ours)
    np.testing.assert_allclose(ours_x, hf_rope(LlamaRotaryEmbedding(cfg), x, positions), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_partial_rotary_matches_gpt_neox(fraction):
    n, h = 2, 32
    cfg = GPTNeoXConfig(hidden_size=n * h, num_attention_heads=n,
                        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0,
                                         "partial_rotary_factor": fraction})
    positions = RNG.integers(0, 300, size=(2, 6))
    x = randn(2, 6, n, h)
    ours = pos.apply_rope(jnp.asarray(x), jnp.asarray(positions), pos.rope_frequencies(int(h * fraction), 1e4))
    ref = hf_rope(GPTNeoXRotaryEmbedding(cfg), x, positions)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ours)[..., int(h * fraction):], x[..., int(h * fraction):])


@pytest.mark.parametrize("rotary,scaling", [(16, None), (8, None), (16, RopeScaling(original_max_position=32))])
def test_rope_scores_depend_only_on_relative_position(rotary, scaling):
    """q.k after RoPE at positions (m, n) equals that at (m + s, n + s), and changes with m - n."""
    h = 16
    inv = pos.rope_frequencies(rotary, 10_000.0, scaling)
    q, k = jnp.asarray(randn(1, 1, 1, h)), jnp.asarray(randn(1, 1, 1, h))

    def score(m, n):
        qm = pos.apply_rope(q, jnp.array([[m]]), inv)
        kn = pos.apply_rope(k, jnp.array([[n]]), inv)
        return float(jnp.sum(qm * kn))

    pairs = [(0, 0), (5, 2), (9, 0), (3, 7), (40, 1)]
    for m, n in pairs:
        for s in (1, 13, 250, 1000):
            chex.assert_trees_all_close(score(m, n), score(m + s, n + s), rtol=1e-4, atol=1e-4)
    assert abs(score(5, 2) - score(6, 2)) > 1e-3  # ... but it does see the distance


def test_rope_frequencies_respond_to_every_scaling_field():
    base = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64)
    changed = {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position": 256}
    assert set(changed) == {f.name for f in dataclasses.fields(RopeScaling)}
    ref = pos.rope_frequencies(64, 500_000.0, base)
    for name, value in changed.items():
        other = pos.rope_frequencies(64, 500_000.0, dataclasses.replace(base, **{name: value}))
        assert not np.allclose(ref, other), name


# ----------------------------------------------------------------------------------- T5, ALiBi, sinusoidal


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 64)])
def test_t5_bucket_matches_hf(buckets, max_distance):
    rel = np.arange(-400, 20)  # memory - query; positive (future) keys are masked anyway
    ours = pos.t5_bucket(jnp.asarray(rel), buckets, max_distance)
    ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=False,
                                                num_buckets=buckets, max_distance=max_distance)
    np.testing.assert_array_equal(ours, ref.numpy())


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 24, 32])
def test_alibi_matches_bloom(n_heads):
    np.testing.assert_allclose(pos.alibi_slopes(n_heads), _get_alibi_slopes(n_heads, "cpu").numpy(), rtol=1e-6)
    s = 9
    bloom = build_alibi_tensor(torch.ones(1, s), n_heads, torch.float32).reshape(n_heads, s).numpy()  # slope*k
    positions = jnp.arange(s)[None]
    ours = np.asarray(pos.alibi_bias(positions, positions, n_heads))[0]  # [N, T, S] = -slope * (q - k)
    # Bloom drops the per-query constant -slope * q (softmax is shift invariant); put it back.
    slopes = pos.alibi_slopes(n_heads)[:, None, None]
    np.testing.assert_allclose(ours + slopes * np.arange(s)[None, :, None], np.broadcast_to(
        bloom[:, None, :], ours.shape), rtol=1e-6, atol=1e-6)


def test_sinusoidal_matches_vaswani_formula():
    d, positions = 16, np.array([[0, 1, 2, 7, 50, 99]])  # float32 angles: 1e-5 holds to ~100
    ours = np.asarray(pos.sinusoidal(jnp.asarray(positions), d))
    ref = np.zeros((1, positions.shape[1], d))
    for j, p in enumerate(positions[0]):
        for i in range(d // 2):  # PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...)
            ref[0, j, 2 * i] = math.sin(p / 10_000 ** (2 * i / d))
            ref[0, j, 2 * i + 1] = math.cos(p / 10_000 ** (2 * i / d))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# --------------------------------------------------------------------------------------- activations, MLP


@pytest.mark.parametrize("ours,ref", [
    ("relu", torch.relu),
    ("gelu", lambda x: torch.nn.functional.gelu(x)),
    ("gelu", ACT2FN["gelu"]),
    ("gelu_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("gelu_tanh", ACT2FN["gelu_pytorch_tanh"]),
    ("gelu_tanh", ACT2FN["gelu_new"]),
    ("silu", torch.nn.functional.silu),
    ("relu2", ACT2FN["relu2"]),
    ("reglu", torch.relu),
    ("geglu", lambda x: torch.nn.functional.gelu(x)),
    ("geglu_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("swiglu", torch.nn.functional.silu),
])
def test_activation_matches_torch(ours, ref):
    x = np.concatenate([np.linspace(-8, 8, 401, dtype=np.float32), randn(200, scale=3.0)])
    np.testing.assert_allclose(ACTIVATIONS[ours](jnp.asarray(x)), ref(t(x)).numpy(), rtol=1e-6, atol=1e-6)


def test_gated_mlp_matches_llama_mlp():
    d, f = 16, 40
    ref = LlamaMLP(LlamaConfig(hidden_size=d, num_attention_heads=2, intermediate_size=f, hidden_act="silu",
                               mlp_bias=True))
    x = randn(2, 5, d)
    w = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours = mlp(jnp.asarray(x), w["up_proj.weight"].T, w["down_proj.weight"].T, ACTIVATIONS["swiglu"],
               w["gate_proj.weight"].T, w["up_proj.bias"], w["down_proj.bias"], w["gate_proj.bias"])
    np.testing.assert_allclose(ours, ref(t(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d_model,multiple_of", [(768, 64), (1536, 64), (2048, 64), (4096, 256), (8192, 256)])
def test_gated_and_plain_mlp_have_the_same_parameters(d_model, multiple_of):
    def count(activation):
        cfg = ModelConfig(d_model=d_model, n_heads=8, activation=activation, d_ff_multiple_of=multiple_of)
        shapes = jax.eval_shape(MLP(cfg).init, jax.random.key(0), jnp.zeros((1, 1, d_model)))
        return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))

    plain, gated = count("gelu"), count("swiglu")
    assert plain == 8 * d_model ** 2
    assert abs(gated / plain - 1) < 0.01, (gated, plain)


# ------------------------------------------------------------------------------------------------ norms


def test_layer_norm_matches_torch():
    d = 48
    x = randn(3, 5, d, scale=4.0) + 2.0
    ref = torch.nn.LayerNorm(d, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(t(randn(d))), ref.bias.copy_(t(randn(d)))
    ours = layer_norm(jnp.asarray(x), ref.weight.detach().numpy(), ref.bias.detach().numpy(), 1e-5)
    np.testing.assert_allclose(ours, ref(t(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    bare = torch.nn.LayerNorm(d, eps=1e-3, elementwise_affine=False)
    np.testing.assert_allclose(layer_norm(jnp.asarray(x), None, None, 1e-3), bare(t(x)).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_llama():
    d = 48
    x = randn(3, 5, d, scale=4.0) + 2.0
    ref = LlamaRMSNorm(d, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(t(randn(d)))
    ours = rms_norm(jnp.asarray(x), ref.weight.detach().numpy(), 1e-6)
    np.testing.assert_allclose(ours, ref(t(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norms_in_bfloat16_stay_finite_and_accurate(norm):
    """bf16 in, bf16 out, statistics in float32: a large offset, fp16-overflowing values, a constant row."""
    d = 256
    x = np.stack([1000.0 + randn(d), 6e4 * randn(d), np.full(d, 3.0, np.float32), 1e-3 * randn(d)])
    xb = jnp.asarray(x, jnp.bfloat16)
    fn = (lambda a: layer_norm(a, None, None, 1e-5)) if norm == "layernorm" else (lambda a: rms_norm(a, None, 1e-5))
    y = fn(xb)
    assert y.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y)))
    ref = fn(xb.astype(jnp.float32))  # the same bf16 inputs, all in float32
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------ masks and attention


def test_masks_equal_hand_written_matrices():
    idx = jnp.arange(6)[None]
    causal = np.tril(np.ones((6, 6), bool))
    window3 = np.array([[1, 0, 0, 0, 0, 0],
                        [1, 1, 0, 0, 0, 0],
                        [1, 1, 1, 0, 0, 0],
                        [0, 1, 1, 1, 0, 0],
                        [0, 0, 1, 1, 1, 0],
                        [0, 0, 0, 1, 1, 1]], bool)
    docs = np.array([[1, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0],
                     [0, 0, 1, 0, 0, 0],
                     [0, 0, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1, 0],
                     [0, 0, 0, 0, 0, 1]], bool)
    seg = jnp.array([[0, 0, 1, 1, 1, 2]])
    np.testing.assert_array_equal(attention_mask(idx, idx)[0], causal)
    np.testing.assert_array_equal(attention_mask(idx, idx, window=3)[0], window3)
    np.testing.assert_array_equal(attention_mask(idx, idx, window=1)[0], np.eye(6, dtype=bool))
    np.testing.assert_array_equal(attention_mask(idx, idx, None, seg, seg)[0], docs)
    np.testing.assert_array_equal(attention_mask(idx, idx, 2, seg, seg)[0], docs & np.tri(6, k=0, dtype=bool)
                                  & ~np.tri(6, k=-2, dtype=bool))
    # a decode step at index 4 against a cache of 6 slots, the last one empty (-1)
    k_idx = jnp.array([[0, 1, 2, 3, 4, -1]])
    np.testing.assert_array_equal(attention_mask(jnp.array([[4]]), k_idx, window=3)[0],
                                  [[0, 0, 1, 1, 1, 0]])


def test_attention_softcap_bounds_logits():
    q, k, v = (jnp.asarray(randn(1, 5, 4, 8, scale=30.0)) for _ in range(3))
    mask = attention_mask(jnp.arange(5)[None], jnp.arange(5)[None])
    out, uncapped = dot_product_attention(q, k, v, mask)
    assert uncapped > 50.0  # the cap below has work to do
    for cap in (50.0, 5.0):  # the cap changes the output; the reported logit is the one before it
        capped_out, reported = dot_product_attention(q, k, v, mask, cap=cap)
        assert not np.allclose(capped_out, out, atol=1e-3) and reported == uncapped
    # what the softmax sees (cap, then bias) is pinned in test_numerics.py
    bias = pos.alibi_bias(jnp.arange(5)[None], jnp.arange(5)[None], 4)
    _, reported = dot_product_attention(q, k, v, mask, bias, cap=5.0)
    assert reported == uncapped


@pytest.mark.slow
def test_gqa_query_head_n_reads_kv_head_n_div_g():
    b, s, n, kv, h = 2, 6, 6, 2, 8
    q, k, v = jnp.asarray(randn(b, s, n, h)), jnp.asarray(randn(b, s, kv, h)), jnp.asarray(randn(b, s, kv, h))
    mask = attention_mask(jnp.arange(s)[None], jnp.arange(s)[None])
    out, _ = dot_product_attention(q, k, v, mask, scale=0.3)
    g = n // kv
    mha, _ = dot_product_attention(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), mask, scale=0.3)
    chex.assert_trees_all_close(out, mha, rtol=1e-6, atol=1e-6)
    wrong, _ = dot_product_attention(q, jnp.tile(k, (1, 1, g, 1)), jnp.tile(v, (1, 1, g, 1)), mask, scale=0.3)
    assert not np.allclose(out, wrong, atol=1e-3)  # the grouping is n // G, not n % K
