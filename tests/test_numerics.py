"""Numbers that must be exactly what they claim: attention's masking, soft-cap and bias order, the reported
max attention logit, learned-position bounds, init scaling, dropout, float32 islands under bfloat16, and the
dtype rule for training."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3.config import Config, ModelConfig
from lecture3.errors import Lecture3Error
from lecture3.layers import positions as pos
from lecture3.layers.attention import attention_mask, dot_product_attention
from lecture3.layers.common import dropout
from lecture3.model import Transformer

pytestmark = [pytest.mark.usefixtures("little_xla_optimisation"), pytest.mark.slow]

RNG = np.random.default_rng(0)
B, T, N, K, H = 2, 6, 4, 2, 8


def randn(*shape, scale=1.0):
    return jnp.asarray(scale * RNG.standard_normal(shape), jnp.float32)


def causal(t=T, b=B):
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    return attention_mask(idx, idx)


def init(cfg: ModelConfig, tokens) -> dict:
    return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens)["params"])


# --- masked value slots (issue 8, item 3) ---

@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_a_non_finite_value_in_a_masked_slot_reaches_no_row_that_cannot_see_it(poison):
    q, k, v = randn(B, T, N, H), randn(B, T, K, H), randn(B, T, K, H)
    clean, _ = dot_product_attention(q, k, v, causal())
    out, _ = dot_product_attention(q, k, v.at[:, 3, :, 0].set(poison), causal())
    # rows 0..2 never see key 3: exactly the clean output (0 * NaN would make them NaN)
    chex.assert_trees_all_close(out[:, :3], clean[:, :3], rtol=1e-6, atol=1e-6)
    assert np.isnan(np.asarray(out[:, 3:])).all()  # rows that see it still report it: nothing is hidden
    # a key no row may see (another document) poisons nothing
    seg = jnp.array([[0, 0, 0, 1, 0, 0]] * B)
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention_mask(idx, idx, None, seg, seg) & (seg[:, None, :] == 0)
    out, _ = dot_product_attention(q, k, v.at[:, 3].set(poison), mask)
    assert np.isfinite(np.asarray(out)).all()


def test_masked_keys_get_exactly_zero_probability_and_a_fully_masked_row_outputs_zeros():
    s = T  # v = identity (head dim = S): the output is the probabilities
    q, k = randn(1, T, N, s, scale=3.0), randn(1, s, K, s, scale=3.0)
    eye = jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (1, s, K, s))
    mask = causal(b=1).at[0, 2].set(False)  # row 2 sees nothing
    probs, _ = dot_product_attention(q, k, eye, mask)  # [1, T, N, S]
    allowed = np.asarray(mask)[0][:, None, :].repeat(N, 1)
    assert (np.asarray(probs)[0][~allowed] == 0).all()
    np.testing.assert_array_equal(probs[0, 2], 0.0)
    np.testing.assert_allclose(np.asarray(probs).sum(-1)[0, [0, 1, 3, 4, 5]], 1.0, rtol=1e-6)


def test_learned_positions_past_the_table_are_an_error_eagerly_and_clipped_under_jit():
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, position="learned", max_seq_len=8)
    tokens = jax.random.randint(jax.random.key(1), (1, 6), 0, 61)
    params, model = init(cfg, tokens), Transformer(cfg)
    past = jnp.arange(4, 10)[None]  # 8 and 9 are past the 8-row table
    with pytest.raises(Lecture3Error, match=r"positions span \[4, 9\] .*max_seq_len=8"):
        model.apply({"params": params}, tokens, positions=past)
    with pytest.raises(Lecture3Error, match="positions span"):
        model.apply({"params": params}, tokens, positions=past - 5)  # negative
    run = jax.jit(lambda p, x: model.apply({"params": p}, tokens, positions=x).logits)
    logits = run(params, past)
    assert np.isfinite(np.asarray(logits)).all()  # was NaN, and spread to the earlier rows through 0 * NaN
    chex.assert_trees_all_close(logits, run(params, jnp.minimum(past, 7)), rtol=1e-6, atol=1e-6)


# --- the max attention logit, the soft-cap and the bias (issue 8, item 4) ---

def test_max_attn_logit_is_measured_after_the_scale_and_before_the_cap():
    q, k, v = randn(B, T, N, H, scale=4.0), randn(B, T, K, H, scale=4.0), randn(B, T, K, H)
    mask, scale = causal(), 0.3
    qg = np.asarray(q).reshape(B, T, K, N // K, H)
    ref = np.einsum("btkgh,bskh->bkgts", qg, np.asarray(k)) * scale
    ref = ref[np.broadcast_to(np.asarray(mask)[:, None, None], ref.shape)].max()
    assert ref > 5.0  # the cap below has work to do
    for cap in (None, 5.0):
        _, reported = dot_product_attention(q, k, v, mask, scale=scale, cap=cap)
        np.testing.assert_allclose(reported, ref, rtol=1e-5)
    bias = pos.alibi_bias(jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.broadcast_to(jnp.arange(T), (B, T)), N)
    _, reported = dot_product_attention(q, k, v, mask, bias, scale=scale, cap=5.0)
    np.testing.assert_allclose(reported, ref, rtol=1e-5)  # and before the position bias


@pytest.mark.parametrize("kind", ["alibi", "t5"])
def test_the_softmax_sees_the_capped_content_logit_plus_the_position_bias(kind):
    cap, scale, s = 2.0, 0.5, T
    q, k = randn(1, T, N, s, scale=3.0), randn(1, s, K, s, scale=3.0)  # head dim S: v = identity below
    idx = jnp.arange(T)[None]
    if kind == "alibi":
        bias = pos.alibi_bias(idx, idx, N)
    else:  # a positive bias, as T5's buckets may learn: the softmax input then exceeds the cap
        bias = jnp.asarray(np.abs(RNG.standard_normal((1, N, T, s))) * 3.0 + 1.0, jnp.float32)
    eye = jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (1, s, K, s))
    probs, _ = dot_product_attention(q, k, eye, causal(b=1), bias, scale=scale, cap=cap)
    qg = np.asarray(q).reshape(1, T, K, N // K, s)
    content = np.einsum("btkgh,bskh->btkgs", qg, np.asarray(k)).reshape(1, T, N, s) * scale
    seen = cap * np.tanh(content / cap) + np.asarray(bias).transpose(0, 2, 1, 3)  # [1, T, N, S]
    seen = np.where(np.tri(T, dtype=bool)[None, :, None, :], seen, -np.inf)
    ref = np.exp(seen - seen.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    if kind == "t5":
        assert seen.max() > cap


def test_the_model_reports_the_attention_logit_before_its_cap():
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, init_std=1.0)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
    params = init(cfg, tokens)

    def layer0(c):
        out = Transformer(c).apply({"params": params}, tokens, capture=("attn_logit_max",))
        return float(out.captured["attn_logit_max"][0].max())  # layer 0, all heads

    uncapped = layer0(cfg)
    assert uncapped > 2.0
    np.testing.assert_allclose(layer0(cfg.replace(attn_logit_softcap=2.0)), uncapped, rtol=1e-6)


# --- half-precision params (issue 8, item 10) ---

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_params_are_rejected_for_training_but_fine_for_inference(dtype):
    with pytest.raises(ValueError, match=rf"ModelConfig.param_dtype='{dtype}' is invalid for training: .*master"):
        Config(model=ModelConfig(param_dtype=dtype))
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, param_dtype=dtype)
    params = init(cfg, jnp.zeros((1, 4), jnp.int32))
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
    Config(model=cfg.replace(param_dtype="float32", dtype=dtype))  # half-precision compute trains


# --- pins: init scaling, dropout, float32 islands ---

def test_residual_projections_start_at_init_std_over_sqrt_2L():
    layers, std = 8, 0.02
    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=layers, n_heads=4, activation="gelu", max_seq_len=16,
                      init_std=std)
    params = init(cfg, jnp.zeros((1, 4), jnp.int32))
    for i in (0, layers - 1):
        layer = params[f"layer_{i}"]
        for name, want in (("attn/o", std / (2 * layers) ** 0.5), ("mlp/down", std / (2 * layers) ** 0.5),
                           ("attn/q", std), ("attn/v", std), ("mlp/up", std)):
            a, b = name.split("/")
            np.testing.assert_allclose(float(jnp.std(layer[a][b])), want, rtol=0.1, err_msg=f"layer_{i}/{name}")


class _Drop(nn.Module):
    rate: float

    def __call__(self, x):
        return dropout(self, x, self.rate, deterministic=False)


def test_dropout_zeroes_a_share_p_and_scales_the_rest_by_1_over_1_minus_p():
    x = jnp.ones((200_000,))
    y = np.asarray(_Drop(0.25).apply({}, x, rngs={"dropout": jax.random.key(0)}))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    np.testing.assert_allclose((y == 0).mean(), 0.25, atol=5e-3)
    np.testing.assert_allclose(y.mean(), 1.0, atol=1e-2)  # the expectation is kept


@pytest.mark.parametrize("where", ["embed_dropout", "resid_dropout", "attn_dropout"])
def test_each_dropout_acts_where_it_says(where):
    """With p ~ 1 everything it touches is dropped: that equals zeroing the weights feeding that point."""
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, init_std=0.25,
                      position="learned", tie_embeddings=False)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
    params, model = init(cfg, tokens), Transformer(cfg)
    dropped = Transformer(cfg.replace(**{where: 1 - 1e-7})).apply(
        {"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)}).logits
    zero = lambda tree, names: {k: (jax.tree.map(jnp.zeros_like, v) if k in names else
                                    zero(v, names) if isinstance(v, dict) else v) for k, v in tree.items()}
    # embed: after the position table is added; resid: each branch output before its residual add;
    # attn: the probabilities, so the attention branch outputs zero while the MLP still runs
    names = {"embed_dropout": ("embed", "pos_embed"), "resid_dropout": ("o", "down"), "attn_dropout": ("o",)}
    reference = model.apply({"params": zero(params, names[where])}, tokens).logits
    chex.assert_trees_all_close(dropped, reference, rtol=1e-5, atol=1e-5)
    assert not np.allclose(reference, model.apply({"params": params}, tokens).logits, atol=1e-3)
    # evaluation (deterministic) ignores every rate
    off = Transformer(cfg.replace(**{where: 0.5})).apply({"params": params}, tokens).logits
    chex.assert_trees_all_close(off, model.apply({"params": params}, tokens).logits, rtol=1e-6, atol=1e-6)


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_softmax_norms_and_logits_are_float32_under_bfloat16_compute(norm):
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dtype="bfloat16",
                      norm=norm, qk_norm="per_head", final_logit_softcap=30.0)
    tokens = jnp.zeros((2, 8), jnp.int32)
    params = init(cfg, tokens)
    closed = jax.make_jaxpr(lambda p: Transformer(cfg).apply({"params": p}, tokens).logits)(params)
    eqns = list(_equations(closed.jaxpr))
    by = lambda name: [e for e in eqns if e.primitive.name == name]
    assert any(e.invars[0].aval.dtype == jnp.bfloat16 for e in by("dot_general"))  # the compute really is bf16
    for name in ("exp", "rsqrt", "tanh"):  # softmax; every norm (2 per layer, qk-norm, final); the logit cap
        assert by(name), name
        assert {e.invars[0].aval.dtype for e in by(name)} == {jnp.dtype(jnp.float32)}, name
    assert len(by("rsqrt")) >= 2 * cfg.n_layers + 1
    assert closed.out_avals[0].dtype == jnp.float32
