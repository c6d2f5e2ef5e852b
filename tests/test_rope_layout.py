"""RoPE's two pairings: "half" (i, i + R/2; GPT-NeoX, Hugging Face) and "interleaved" (2i, 2i + 1; RoFormer,
GPT-J, Meta's Llama). The interleaved form is checked against the complex-number form of Meta's reference
`apply_rotary_emb` (written here in numpy); the two layouts are one model up to a permutation of q's and k's
head dims, and `hf.save_pretrained` writes an interleaved model as the equivalent half-layout checkpoint.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3.config import ModelConfig
from lecture3.layers import positions as pos
from lecture3.model import Transformer

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def meta_interleaved_rope(x: np.ndarray, positions: np.ndarray, rotary: int, theta: float) -> np.ndarray:
    """Meta Llama's apply_rotary_emb: adjacent dims (2i, 2i+1) as one complex number times e^{i m theta_i}."""
    freqs = 1.0 / theta ** (np.arange(0, rotary, 2, dtype=np.float64) / rotary)  # [R/2]
    cis = np.exp(1j * positions[..., None] * freqs)[:, :, None, :]  # [B, T, 1, R/2]
    rot = x[..., :rotary].astype(np.float64)
    z = (rot[..., 0::2] + 1j * rot[..., 1::2]) * cis  # view_as_complex(x.reshape(..., -1, 2)) * freqs_cis
    out = np.stack([z.real, z.imag], axis=-1).reshape(rot.shape)  # view_as_real(...).flatten(3)
    return np.concatenate([out, x[..., rotary:]], axis=-1)


@pytest.mark.parametrize("rotary", [16, 8, 4], ids=lambda r: f"rotary{r}of16")
@pytest.mark.parametrize("theta", [10_000.0, 500_000.0])
def test_interleaved_rope_matches_meta_complex_reference(rotary, theta):
    x, positions = randn(2, 7, 3, 16), RNG.integers(0, 300, size=(2, 7))
    ours = pos.apply_rope(jnp.asarray(x), jnp.asarray(positions), pos.rope_frequencies(rotary, theta), "interleaved")
    np.testing.assert_allclose(ours, meta_interleaved_rope(x, positions, rotary, theta), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ours)[..., rotary:], x[..., rotary:])  # partial: the rest untouched
    half = pos.apply_rope(jnp.asarray(x), jnp.asarray(positions), pos.rope_frequencies(rotary, theta), "half")
    assert np.abs(np.asarray(half) - np.asarray(ours)).max() > 0.1  # the layouts do differ


@pytest.mark.parametrize("rotary", [16, 8])
def test_interleaved_is_half_on_permuted_head_dims(rotary):
    """rope_half(x[..., p]) == rope_interleaved(x)[..., p] with p = (0, 2, .., 1, 3, .., R, ..)."""
    x, positions = randn(2, 5, 2, 16), RNG.integers(0, 100, size=(2, 5))
    p = pos.rope_permutation(16, rotary)
    assert sorted(p) == list(range(16))
    inv = pos.rope_frequencies(rotary, 10_000.0)
    half = pos.apply_rope(jnp.asarray(x[..., p]), jnp.asarray(positions), inv, "half")
    inter = pos.apply_rope(jnp.asarray(x), jnp.asarray(positions), inv, "interleaved")
    np.testing.assert_allclose(half, np.asarray(inter)[..., p], rtol=1e-6, atol=1e-6)


def test_unknown_layout_is_an_error():
    with pytest.raises(ValueError, match="rope layout 'nope'"):
        pos.apply_rope(jnp.zeros((1, 1, 1, 4)), jnp.zeros((1, 1), jnp.int32), pos.rope_frequencies(4, 1e4), "nope")


@pytest.mark.parametrize("fields,match", [
    (dict(rope_layout="adjacent"), r"rope_layout='adjacent' is invalid: expected one of 'half', 'interleaved'"),
    (dict(position="alibi", rope_layout="interleaved"), r"rope_layout='interleaved' is invalid: expected 'half' "
                                                         r"with position='alibi'"),
])
def test_config_validates_rope_layout(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**fields)


SIZES = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
TOKENS = jnp.asarray(RNG.integers(0, 61, size=(2, 10)))


def random_params(cfg: ModelConfig) -> dict:
    """Random values in init's tree: gains near one, the rest far from init (a dropped permutation shows)."""
    rng = np.random.default_rng(1)
    abstract = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), TOKENS))

    def leaf(path, a):
        gain = jax.tree_util.keystr(path).endswith(("'scale']", "'q_norm']", "'k_norm']"))
        return jnp.asarray((gain + 0.3 * rng.standard_normal(a.shape)).astype(np.float32))

    return jax.tree_util.tree_map_with_path(leaf, nn.unbox(abstract["params"]))


@pytest.mark.parametrize("extra", [dict(), dict(rope_fraction=0.5, qkv_bias=True, qk_norm="per_head"),
                                   dict(qk_norm="full")], ids=["plain", "partial-bias-qknorm", "full-qknorm"])
@pytest.mark.slow
def test_interleaved_model_is_the_half_model_with_permuted_q_k(extra):
    """The known equivalence (transformers' convert_llama_weights_to_hf): permute the head dims of the q/k
    projections (and their biases and qk-norm gains) and the half-layout model computes the same logits."""
    inter = ModelConfig(**SIZES, **extra, rope_layout="interleaved")
    half = inter.replace(rope_layout="half")
    params = random_params(inter)
    h = inter.resolved_head_dim
    p = pos.rope_permutation(h, int(h * inter.rope_fraction))

    def permute(a):  # [..., H] or [..., heads * H]: reorder each head's dims
        a = np.asarray(a)
        return jnp.asarray(a.reshape(*a.shape[:-1], -1, h)[..., p].reshape(a.shape))

    permuted = jax.tree.map(lambda a: a, params)
    for i in range(inter.n_layers):
        attn = permuted[f"layer_{i}"]["attn"]
        for name in [n for n in attn if n in ("q", "k", "q_bias", "k_bias", "q_norm", "k_norm")]:
            attn[name] = permute(attn[name])
    ours = Transformer(inter).apply({"params": params}, TOKENS).logits
    np.testing.assert_allclose(Transformer(half).apply({"params": permuted}, TOKENS).logits, ours, rtol=2e-5, atol=2e-5)
    unpermuted = Transformer(half).apply({"params": params}, TOKENS).logits
    assert np.abs(np.asarray(unpermuted) - np.asarray(ours)).max() > 1e-2


HF_CASES = {  # family -> an interleaved config it saves: separate q/k (+ bias), fused qkv (+ partial), qk-norm
    "llama": dict(n_kv_heads=2, qkv_bias=True, attn_out_bias=True, tie_embeddings=False),
    "olmo2": dict(norm_position="post_branch", qk_norm="full", tie_embeddings=False),
    "gpt_neox": dict(norm="layernorm", norm_bias=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                     activation="gelu", block="parallel", parallel_norm="separate", rope_fraction=0.5,
                     tie_embeddings=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", HF_CASES)
def test_save_pretrained_writes_an_interleaved_model_in_hf_half_layout(family, tmp_path):
    """HF checkpoints are all "half": save permutes q/k, transformers computes our logits, and loading gives
    the half-layout config with the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lecture3 import hf
    from lecture3.hf.families import canonical

    sizes = dict(SIZES, n_kv_heads=None) if family == "gpt_neox" else SIZES
    cfg = ModelConfig(**{**sizes, **HF_CASES[family]}, rope_layout="interleaved")
    params = random_params(cfg)
    ours = np.asarray(Transformer(cfg).apply({"params": params}, TOKENS).logits)
    assert hf.save_pretrained(cfg, params, tmp_path) == family
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(np.asarray(TOKENS), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    back_cfg, back = hf.load_pretrained(tmp_path)
    assert back_cfg.rope_layout == "half" and canonical(back_cfg) == canonical(cfg.replace(rope_layout="half"))
    np.testing.assert_allclose(Transformer(back_cfg).apply({"params": back}, TOKENS).logits, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_has_the_gradients_of_the_rotation(layout):
    """apply_rope has its own VJP (the rotation by minus the angle); it must equal autodiff through the
    plain formula, for x and for cos and sin, with partial rotary dims passing their cotangent through."""
    b, t, n, h, rotary = 2, 7, 3, 12, 8
    x, g = jnp.asarray(randn(b, t, n, h)), jnp.asarray(randn(b, t, n, h))
    angles = jnp.asarray(RNG.integers(0, 50, (b, t)))[..., None] * jnp.asarray(pos.rope_frequencies(rotary, 1e4))
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]

    def plain(x, cos, sin):
        rot = x[..., :rotary]
        x1, x2 = (rot[..., :rotary // 2], rot[..., rotary // 2:]) if layout == "half" else (rot[..., 0::2],
                                                                                             rot[..., 1::2])
        a, c = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        out = jnp.concatenate([a, c], -1) if layout == "half" else jnp.stack([a, c], -1).reshape(rot.shape)
        return jnp.concatenate([out, x[..., rotary:]], axis=-1)

    ours = jax.vjp(lambda *a: pos._rotate(*a, layout), x, cos, sin)
    ref = jax.vjp(plain, x, cos, sin)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-6)
    for got, want in zip(ours[1](g), ref[1](g), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(ours[1](g)[0][..., rotary:], g[..., rotary:])
