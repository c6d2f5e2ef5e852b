"""Presets: every family at every size builds (abstractly), matches its published parameter count and keeps
the choices that made the family known; tiny sizes run a real forward pass."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import Transformer, accounting, presets

ALL = [(family, size) for family in presets.names() for size in presets.sizes(family)]

# Published parameter counts. Exact ones (tolerance 0) were checked against transformers 5.24: the HF config
# with the published hyperparameters, built on the meta device (`with torch.device("meta"):
# AutoModelForCausalLM.from_config(cfg)`), summing `numel` of its (deduplicated, so tied-once) parameters.
# PaLM has no HF class: its counts are the paper's Table 1 (Chowdhery et al. 2022), given to 0.01B.
PUBLISHED = {
    ("gpt2", "124m"): (124_439_808, 0.0),
    ("gpt2", "355m"): (354_823_168, 0.0),
    ("gpt2", "774m"): (774_030_080, 0.0),
    ("gpt2", "1.5b"): (1_557_611_200, 0.0),
    ("llama3", "1b"): (1_235_814_400, 0.0),  # Llama-3.2-1B
    ("llama3", "3b"): (3_212_749_824, 0.0),  # Llama-3.2-3B
    ("llama3", "8b"): (8_030_261_248, 0.0),
    ("llama3", "3.1-8b"): (8_030_261_248, 0.0),
    ("llama3", "70b"): (70_553_706_496, 0.0),
    ("gemma2", "2b"): (2_614_341_888, 0.0),
    ("gemma2", "9b"): (9_241_705_984, 0.0),
    ("gemma2", "27b"): (27_227_128_320, 0.0),
    ("mistral", "7b"): (7_241_732_096, 0.0),
    ("qwen2", "0.5b"): (494_032_768, 0.0),
    ("qwen2", "1.5b"): (1_543_714_304, 0.0),
    ("qwen2", "7b"): (7_615_616_512, 0.0),
    ("olmo2", "1b"): (1_484_916_736, 0.0),
    ("olmo2", "7b"): (7_298_617_344, 0.0),
    ("olmo2", "13b"): (13_716_198_400, 0.0),
    ("gpt_neox", "pythia-160m"): (162_322_944, 0.0),
    ("gpt_neox", "pythia-1.4b"): (1_414_647_808, 0.0),
    ("gpt_neox", "20b"): (20_554_567_680, 0.0),
    ("palm", "8b"): (8.63e9, 0.005e9),
    ("palm", "62b"): (62.50e9, 0.005e9),
    ("palm", "540b"): (540.35e9, 0.01e9),  # the table's 540.35B; our exact count is 540,356,474,880
}


def abstract_params(cfg):
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda rng, t: Transformer(cfg).init(rng, t), jax.random.key(0), tokens)["params"]


@pytest.mark.parametrize("family,size", ALL, ids=[f"{f}-{s}" for f, s in ALL])
def test_every_preset_builds_abstractly_with_the_accounted_and_published_count(family, size):
    # scan_layers: one traced layer group whatever the depth, so 118-layer PaLM costs what a tiny model does
    cfg = dataclasses.replace(presets.get(family, size), scan_layers=True)
    n = accounting.count_params(abstract_params(cfg))
    assert n == accounting.param_counts(cfg)["total"]
    if (family, size) in PUBLISHED:
        published, tolerance = PUBLISHED[(family, size)]
        assert abs(n - published) <= tolerance, (family, size, n, published)


def test_every_published_size_has_a_published_count():
    assert {fs for fs in ALL if fs[1] != "tiny" and fs[0] != "modern"} == set(PUBLISHED)


def test_names_sizes_and_aliases():
    assert presets.names() == ("gpt2", "llama3", "gemma2", "mistral", "qwen2", "olmo2", "gpt_neox", "palm",
                               "modern")
    required = {
        "gpt2": {"124m", "355m", "774m", "1.5b"}, "llama3": {"1b", "3b", "8b", "70b"},
        "gemma2": {"2b", "9b", "27b"}, "mistral": {"7b"}, "qwen2": {"0.5b", "1.5b", "7b"},
        "olmo2": {"1b", "7b", "13b"}, "gpt_neox": {"pythia-160m", "pythia-1.4b", "20b"},
        "palm": {"8b", "62b", "540b"}, "modern": set(),
    }
    for family, sizes in required.items():
        assert presets.sizes(family)[0] == "tiny"
        assert sizes <= set(presets.sizes(family))
    assert len(presets.sizes("modern")) >= 2
    assert presets.get("gpt2", "small") is presets.get("gpt2", "124m")
    assert presets.get("llama3") is presets.get("llama3", size="tiny")


def test_unknown_family_or_size_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset family 'llama4'.*gpt2, llama3, gemma2"):
        presets.get("llama4")
    with pytest.raises(ValueError, match="unknown size '13b' for preset family 'llama3'.*tiny, 1b, 3b, 8b"):
        presets.get("llama3", size="13b")
    with pytest.raises(ValueError, match="expected one of"):
        presets.sizes("nope")


@pytest.mark.parametrize("family", presets.names())
def test_tiny_is_tiny(family):
    cfg = presets.get(family, "tiny")
    assert cfg.vocab_size == 259
    assert 64 <= cfg.d_model <= 128 and 2 <= cfg.n_layers <= 4 and 256 <= cfg.max_seq_len <= 512
    assert cfg.sliding_window is None or cfg.sliding_window <= 32


def random_params(cfg, tokens):
    """Real arrays in the tree `init` builds (traced by eval_shape), filled by numpy: nothing to compile."""
    abstract = jax.eval_shape(lambda rng: Transformer(cfg).init(rng, tokens), jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.02, s.shape), s.dtype), nn.unbox(abstract))


@pytest.mark.parametrize("family", presets.names())
@pytest.mark.slow
def test_tiny_runs_a_real_forward_pass(family):
    """Finite logits of the right shape; row 1 is row 0 with its first token changed, so the first token
    reaches later logits through global layers and, in all-local Mistral, stops at the stack's reach."""
    cfg = presets.get(family, "tiny")
    row = jax.random.randint(jax.random.key(1), (48,), 0, cfg.vocab_size)  # longer than the tiny windows
    tokens = jnp.stack([row, row.at[0].set((row[0] + 1) % cfg.vocab_size)])
    logits = np.asarray(jax.jit(Transformer(cfg).apply)({"params": random_params(cfg, tokens)}, tokens).logits)
    assert logits.shape == (2, 48, cfg.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and logits.std() > 0
    changed = np.abs(logits[0] - logits[1]).max(-1) > 0  # [T]: which positions saw the changed token
    if "global" in cfg.layer_pattern:
        assert changed.all()
    else:  # every layer local: a token reaches n_layers * (window - 1) positions ahead, no further
        reach = cfg.n_layers * (cfg.sliding_window - 1)
        assert reach + 1 < 48 and changed[: reach + 1].all() and not changed[reach + 1:].any()


def _no_biases(c):
    return not (c.qkv_bias or c.attn_out_bias or c.mlp_bias or c.norm_bias)


def _gqa(c):
    return 1 < c.resolved_n_kv_heads < c.n_heads


# What made each family known; held at every size, tiny included.
DISTINCTIVE = {
    "gpt2": lambda c: (c.norm == "layernorm" and c.norm_bias and c.qkv_bias and c.attn_out_bias and c.mlp_bias
                       and c.norm_position == "pre" and c.activation == "gelu_tanh"
                       and c.position == "learned" and c.tie_embeddings),
    "llama3": lambda c: (c.norm == "rmsnorm" and c.activation == "swiglu" and c.position == "rope"
                         and c.rope_theta == 500_000 and _gqa(c) and _no_biases(c)),
    "gemma2": lambda c: (c.norm_position == "sandwich" and c.activation == "geglu_tanh"
                         and c.attn_logit_softcap == 50.0 and c.final_logit_softcap == 30.0
                         and c.layer_pattern == ("local", "global") and c.sliding_window is not None
                         and c.scale_embeddings and c.tie_embeddings and _gqa(c)
                         and c.resolved_head_dim * c.n_heads != c.d_model and c.query_scale is not None),
    "mistral": lambda c: c.layer_pattern == ("local",) and c.sliding_window is not None and _gqa(c),
    "qwen2": lambda c: c.qkv_bias and not c.attn_out_bias and not c.mlp_bias and c.rope_theta == 1e6,
    "olmo2": lambda c: (c.norm_position == "post_branch" and c.qk_norm == "full" and c.norm == "rmsnorm"
                        and not c.tie_embeddings),
    "gpt_neox": lambda c: (c.block == "parallel" and c.parallel_norm == "separate" and c.rope_fraction == 0.25
                           and c.norm == "layernorm" and c.norm_bias and not c.tie_embeddings),
    "palm": lambda c: (c.block == "parallel" and c.parallel_norm == "shared" and c.activation == "swiglu"
                       and c.resolved_n_kv_heads == 1 and _no_biases(c) and c.tie_embeddings
                       and c.resolved_d_ff == 4 * c.d_model),
    "modern": lambda c: (c.norm == "rmsnorm" and c.norm_position == "pre" and _no_biases(c)
                         and c.activation == "swiglu" and c.d_ff is None and c.position == "rope" and _gqa(c)
                         and c.qk_norm is not None and not c.tie_embeddings and c.head_dim is None
                         and c.embed_dropout is None and c.resid_dropout is None and c.attn_dropout is None),
}


@pytest.mark.parametrize("family,size", ALL, ids=[f"{f}-{s}" for f, s in ALL])
def test_distinctive_options_are_kept(family, size):
    assert DISTINCTIVE[family](presets.get(family, size))


def test_published_details():
    g = presets.get
    l8 = g("llama3", "8b")
    assert (l8.vocab_size, l8.d_ff, l8.n_kv_heads, l8.rope_theta, l8.tie_embeddings, l8.rope_scaling) == (
        128256, 14336, 8, 500_000.0, False, None)
    assert g("llama3", "3.1-8b").rope_scaling.factor == 8.0
    assert g("llama3", "1b").rope_scaling.factor == 32.0 and g("llama3", "1b").tie_embeddings
    for size in ("2b", "9b", "27b"):
        c = g("gemma2", size)
        assert (c.vocab_size, c.sliding_window) == (256000, 4096)
    assert g("gemma2", "2b").head_dim == 256 and g("gemma2", "2b").query_scale == 256 ** -0.5
    assert g("gemma2", "27b").head_dim == 128 and g("gemma2", "27b").query_scale == 144 ** -0.5
    assert g("mistral", "7b").sliding_window == 4096 and g("mistral", "7b").n_kv_heads == 8
    assert g("gpt2", "124m").vocab_size == 50257 and g("gpt2", "124m").max_seq_len == 1024
    assert g("gpt_neox", "pythia-160m").vocab_size == 50304 and g("gpt_neox", "20b").vocab_size == 50432
    assert g("qwen2", "0.5b").tie_embeddings and not g("qwen2", "7b").tie_embeddings
    assert g("palm", "540b").head_dim == 256 and g("palm", "540b").n_kv_heads == 1
    assert g("modern", "7b").resolved_d_ff == 11008  # 8/3 * 4096 rounded up to 256
