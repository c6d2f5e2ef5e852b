"""Looking inside: captured intermediates are what they say, in layer order, and free when not asked for."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import Transformer
from lecture3.capture import CAPTURES
from lecture3.config import ModelConfig
from lecture3.layers import positions as pos
from lecture3.layers.norms import NORMS
from lecture3.model import Output, stack_layers, unstack_layers

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, max_seq_len=16,
                  layer_pattern=("local", "global"), sliding_window=3)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 7)), jnp.int32)


def _params(cfg, seed=0):
    return nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(seed), TOKENS)["params"])


def test_attention_probabilities_are_distributions_under_the_masks():
    params = _params(CFG)
    out = Transformer(CFG).apply({"params": params}, TOKENS, capture=("attn_probs",))
    assert isinstance(out, Output) and out.cache is None
    probs = np.asarray(out.captured["attn_probs"])  # [L, B, N, T, S]
    assert probs.shape == (2, 2, 4, 7, 7)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    q, k = np.arange(7)[:, None], np.arange(7)[None, :]
    assert np.all(probs[:, :, :, k > q] == 0)  # causal, both layers
    assert np.all(probs[0][:, :, (q - k) >= 3] == 0)  # layer 0 is local with window 3
    assert np.any(probs[1][:, :, (q - k) >= 3] > 0)  # layer 1 is global: it does look further back


def test_attention_probabilities_equal_a_hand_computation_from_q_and_k():
    params = _params(CFG, seed=1)
    out = Transformer(CFG).apply({"params": params}, TOKENS, capture=("attn_probs", "hidden_states"))
    h_in = [jnp.take(params["embed"], TOKENS, axis=0), out.captured["hidden_states"][0]]
    g = CFG.n_heads // CFG.resolved_n_kv_heads
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    inv = pos.rope_frequencies(CFG.resolved_head_dim, CFG.rope_theta)
    for layer, window in ((0, 3), (1, None)):
        p = params[f"layer_{layer}"]
        h = NORMS["rmsnorm"](h_in[layer], p["attn_norm"]["scale"], None, CFG.norm_eps)
        q = pos.apply_rope(jnp.einsum("btd,dnh->btnh", h, p["attn"]["q"]), positions, inv)
        k = pos.apply_rope(jnp.einsum("btd,dkh->btkh", h, p["attn"]["k"]), positions, inv)
        k = jnp.repeat(k, g, axis=2)  # query head n reads kv head n // G
        logits = np.asarray(jnp.einsum("btnh,bsnh->bnts", q, k)) / np.sqrt(CFG.resolved_head_dim)
        t, s = np.arange(7)[:, None], np.arange(7)[None, :]
        allowed = (s <= t) & ((t - s < window) if window else True)
        logits = np.where(allowed, logits, -np.inf)
        expected = np.exp(logits - logits.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(out.captured["attn_probs"][layer], expected, atol=2e-5)


def test_residual_rms_is_the_rms_of_the_captured_hidden_states_and_logz_of_the_logits():
    params = _params(CFG, seed=2)
    out = Transformer(CFG).apply({"params": params}, TOKENS, capture=("resid_rms", "hidden_states", "log_z"))
    hs = np.asarray(out.captured["hidden_states"])  # [L, B, T, D]
    np.testing.assert_allclose(out.captured["resid_rms"], np.sqrt((hs ** 2).mean(-1)), rtol=1e-5)
    np.testing.assert_allclose(out.captured["log_z"], jax.nn.logsumexp(out.logits, -1), rtol=1e-6)
    assert list(out.captured) == ["resid_rms", "hidden_states", "log_z"]  # exactly what was asked for


@pytest.mark.parametrize("norm_position", ["pre", "post", "sandwich", "post_branch"])
def test_branch_rms_and_norms_have_their_documented_shapes(norm_position):
    cfg = CFG.replace(norm_position=norm_position, qk_norm="per_head", norm_eps=1e-10)
    out = Transformer(cfg).apply({"params": _params(cfg)}, TOKENS, capture=tuple(CAPTURES))
    L, B, T, N, K = 2, 2, 7, 4, 2
    shapes = {"attn_probs": (L, B, N, T, T), "attn_logit_max": (L, N), "attn_entropy": (L, B, N, T),
              "q_norm": (L, B, T, N), "k_norm": (L, B, T, K), "attn_out_rms": (L, B, T), "mlp_out_rms": (L, B, T),
              "resid_rms": (L, B, T), "hidden_states": (L, B, T, 32), "log_z": (B, T)}
    assert {k: v.shape for k, v in out.captured.items()} == shapes
    # qk-norm with unit gains: every q and k enters the dot product at norm sqrt(H) (RoPE keeps norms)
    np.testing.assert_allclose(out.captured["q_norm"], np.sqrt(8.0), rtol=1e-3)
    np.testing.assert_allclose(out.captured["k_norm"], np.sqrt(8.0), rtol=1e-3)
    if norm_position == "sandwich":  # the branch output is normed before it is added: RMS 1 with unit gains
        np.testing.assert_allclose(out.captured["attn_out_rms"], 1.0, rtol=1e-3)


def test_entropy_and_max_logit_agree_with_the_probabilities():
    cfg = CFG.replace(attn_logit_softcap=0.5)
    out = Transformer(cfg).apply({"params": _params(cfg, 3)}, TOKENS,
                                 capture=("attn_probs", "attn_entropy", "attn_logit_max"))
    p = np.asarray(out.captured["attn_probs"], np.float64)
    ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1)
    np.testing.assert_allclose(out.captured["attn_entropy"], ent, atol=1e-5)
    assert np.all(np.asarray(out.captured["attn_logit_max"]) > -np.inf)


def test_scanned_captures_come_in_layer_order():
    cfg = CFG.replace(n_layers=4)
    params = _params(cfg, 4)
    names = ("attn_probs", "attn_logit_max", "resid_rms", "hidden_states")
    plain = Transformer(cfg).apply({"params": params}, TOKENS, capture=names)
    scanned_cfg = cfg.replace(scan_layers=True)
    sparams = {k: v for k, v in params.items() if not k.startswith("layer_")}
    sparams.update(stack_layers(scanned_cfg, unstack_layers(cfg, params)))
    scanned = Transformer(scanned_cfg).apply({"params": sparams}, TOKENS, capture=names)
    for name in names:
        np.testing.assert_allclose(scanned.captured[name], plain.captured[name], atol=1e-5, err_msg=name)


def test_capture_off_adds_nothing_to_the_program():
    params = _params(CFG)
    model = Transformer(CFG)
    off = jax.make_jaxpr(lambda p: model.apply({"params": p}, TOKENS).logits)(params)
    empty = jax.make_jaxpr(lambda p: model.apply({"params": p}, TOKENS, capture=()).logits)(params)
    full = jax.make_jaxpr(lambda p: model.apply({"params": p}, TOKENS, capture=tuple(CAPTURES)).logits)(params)
    assert len(off.eqns) == len(empty.eqns) and str(off) == str(empty)
    assert len(full.eqns) > len(off.eqns)  # asking for captures does add work


def test_unknown_capture_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown capture name"):
        Transformer(CFG).apply({"params": _params(CFG)}, TOKENS, capture=("attention",))


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_the_layers_in_batch_parts_give_the_same_logits_and_captures(scan):
    cfg = CFG.replace(n_layers=4, scan_layers=scan, document_mask=True)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (4, 7)), jnp.int32)
    segments = jnp.asarray([[0] * 3 + [1] * 4] * 2 + [[0] * 5 + [1] * 2] * 2, jnp.int32)
    params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens)["params"])

    def run(splits):
        return Transformer(cfg).apply({"params": params}, tokens, segment_ids=segments, capture=tuple(CAPTURES),
                                      splits=splits)

    one, two = run(1), run(2)
    np.testing.assert_allclose(two.logits, one.logits, rtol=1e-5, atol=1e-5)
    for name in CAPTURES:  # each capture whole: batch rows in order, the per-head max over every row
        assert two.captured[name].shape == one.captured[name].shape, name
        np.testing.assert_allclose(two.captured[name], one.captured[name], rtol=1e-5, atol=1e-5, err_msg=name)
    count = lambda s: str(jax.make_jaxpr(lambda p: Transformer(cfg).apply({"params": p}, tokens, splits=s).logits)(  # noqa: E731
        params)).count("dot_general")
    assert count(2) > count(1)  # the layers really ran once per part


def test_a_split_with_a_cache_is_refused():
    from lecture3.errors import Lecture3Error
    from lecture3.layers.kv_cache import init_cache

    params = _params(CFG)
    cache = init_cache(CFG, 2, 16)
    with pytest.raises(Lecture3Error, match="decoding with a cache takes splits=1"):
        Transformer(CFG).apply({"params": params}, TOKENS, cache=cache, splits=2)
