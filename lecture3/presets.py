"""Named configs of the families that made each architecture choice known, at tiny and published sizes.

    cfg = presets.get("llama3", size="tiny")     # a CPU-sized model that keeps the family's choices
    cfg = presets.get("llama3", size="8b")       # the published hyperparameters (check with jax.eval_shape)
    presets.names(); presets.sizes("gemma2")

`PRESETS[family][size]` is a plain dict of `ModelConfig`s; variants are `dataclasses.replace` of a base.
Tiny sizes use the byte tokenizer's 259-token vocabulary, 2-4 layers, d_model 64-128 and small sliding
windows (16 or 32) so that test sequences longer than the window exercise the local layers.
Published vocabularies keep their padding (GPT-2 50257, Pythia 50304, GPT-NeoX-20B 50432, Qwen2-7B 152064).
"""

from __future__ import annotations

import dataclasses

from lecture3.config import ModelConfig, RopeScaling

TINY_VOCAB = 259  # the byte tokenizer: 256 bytes + specials


def _sizes(family: dict, tiny: dict, published: dict[str, dict]) -> dict[str, ModelConfig]:
    """The family's choices at the tiny size and at each published size, each validated as a ModelConfig."""
    out = {"tiny": ModelConfig(**{**family, "vocab_size": TINY_VOCAB, **tiny})}
    out.update({name: ModelConfig(**{**family, **changes}) for name, changes in published.items()})
    return out


# GPT-2 (Radford et al. 2019): pre-norm LayerNorm with biases, biases everywhere, GELU (tanh), 4x MLP,
# learned absolute positions, tied head.
_GPT2 = dict(
    vocab_size=50257, max_seq_len=1024, norm="layernorm", norm_position="pre", norm_bias=True, norm_eps=1e-5,
    qkv_bias=True, attn_out_bias=True, mlp_bias=True, activation="gelu_tanh", position="learned",
    tie_embeddings=True,
)

# Llama 3 (Grattafiori et al. 2024): RMSNorm, SwiGLU, RoPE theta 500k, GQA with 8 kv heads, no biases.
_LLAMA3 = dict(
    vocab_size=128256, max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5, activation="swiglu", position="rope",
    rope_theta=500_000.0, n_kv_heads=8, tie_embeddings=False, d_ff_multiple_of=256,
)
_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position=8192)
_LLAMA32_SCALING = dataclasses.replace(_LLAMA31_SCALING, factor=32.0)  # Llama 3.2 config.json: factor 32

# Gemma 2 (Gemma Team 2024): sandwich RMSNorm, GeGLU (tanh), head_dim 256 decoupled from d_model,
# soft-caps 50 (attention) / 30 (logits), local 4096-window layers alternating with global ones,
# embeddings scaled by sqrt(d_model), tied head, 256k vocabulary.
_GEMMA2 = dict(
    vocab_size=256000, max_seq_len=8192, norm="rmsnorm", norm_position="sandwich", norm_eps=1e-6,
    activation="geglu_tanh", position="rope", rope_theta=10_000.0, head_dim=256, query_scale=256 ** -0.5,
    attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096, layer_pattern=("local", "global"),
    scale_embeddings=True, tie_embeddings=True,
)

# Mistral 7B v0.1 (Jiang et al. 2023): Llama-like, GQA 8, a 4096 sliding window on every layer.
_MISTRAL = dict(
    vocab_size=32000, max_seq_len=32768, norm="rmsnorm", norm_eps=1e-5, activation="swiglu", position="rope",
    rope_theta=10_000.0, n_kv_heads=8, sliding_window=4096, layer_pattern=("local",), tie_embeddings=False,
)

# Qwen2 (Yang et al. 2024): Llama-like with a bias on q/k/v only, RoPE theta 1M, tied head for small sizes.
_QWEN2 = dict(
    vocab_size=151936, max_seq_len=32768, norm="rmsnorm", norm_eps=1e-6, activation="swiglu", position="rope",
    rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True,
)

# OLMo 2 (OLMo Team 2024): norm on each branch output only (post_branch), qk-norm over the whole
# projection, RMSNorm, SwiGLU, RoPE theta 500k, MHA, untied.
_OLMO2 = dict(
    vocab_size=100352, max_seq_len=4096, norm="rmsnorm", norm_position="post_branch", norm_eps=1e-6,
    qk_norm="full", activation="swiglu", position="rope", rope_theta=500_000.0, tie_embeddings=False,
)

# GPT-NeoX / Pythia (Black et al. 2022; Biderman et al. 2023): parallel block with separate LayerNorms
# (with bias), biases everywhere, exact GELU, RoPE on 25% of each head, untied head.
_GPT_NEOX = dict(
    vocab_size=50304, max_seq_len=2048, norm="layernorm", norm_bias=True, norm_eps=1e-5, qkv_bias=True,
    attn_out_bias=True, mlp_bias=True, activation="gelu", block="parallel", parallel_norm="separate",
    position="rope", rope_theta=10_000.0, rope_fraction=0.25, tie_embeddings=False,
)

# PaLM (Chowdhery et al. 2022): parallel block with one shared LayerNorm, SwiGLU with d_ff = 4 d_model,
# MQA, head_dim 256, RoPE, no biases in dense kernels or norms, tied head, 256k vocabulary.
_PALM = dict(
    vocab_size=256000, max_seq_len=2048, norm="layernorm", norm_bias=False, activation="swiglu",
    block="parallel", parallel_norm="shared", n_kv_heads=1, head_dim=256, position="rope",
    tie_embeddings=True,
)

# The lecture's consensus: pre-norm RMSNorm, no biases, SwiGLU at 8/3, RoPE, GQA, qk-norm, untied,
# head_dim = d_model / n_heads, no dropout.
_MODERN = dict(
    vocab_size=128256, max_seq_len=8192, norm="rmsnorm", norm_position="pre", activation="swiglu",
    d_ff_multiple_of=256, position="rope", rope_theta=500_000.0, qk_norm="per_head", tie_embeddings=False,
)

_TINY = dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=256)

PRESETS: dict[str, dict[str, ModelConfig]] = {
    "gpt2": _sizes(
        _GPT2, tiny=dict(_TINY, max_seq_len=512),
        published={"124m": dict(d_model=768, n_layers=12, n_heads=12),
                   "355m": dict(d_model=1024, n_layers=24, n_heads=16),
                   "774m": dict(d_model=1280, n_layers=36, n_heads=20),
                   "1.5b": dict(d_model=1600, n_layers=48, n_heads=25)},
    ),
    "llama3": _sizes(
        # tiny: the 3.1 scaling at the tiny context (original 64 < max_seq_len 256, as in 8192 < 131072)
        _LLAMA3, tiny=dict(_TINY, n_kv_heads=2, d_ff=192,
                           rope_scaling=dataclasses.replace(_LLAMA31_SCALING, original_max_position=64)),
        # Llama 3.2 1B / 3B: tied, 128k context through RoPE scaling factor 32
        published={"1b": dict(d_model=2048, n_layers=16, n_heads=32, d_ff=8192, tie_embeddings=True,
                               max_seq_len=131072, rope_scaling=_LLAMA32_SCALING),
                   "3b": dict(d_model=3072, n_layers=28, n_heads=24, d_ff=8192, tie_embeddings=True,
                               max_seq_len=131072, rope_scaling=_LLAMA32_SCALING),
                   "8b": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=14336),  # Llama-3-8B: 8k context
                   "3.1-8b": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=14336, max_seq_len=131072,
                                   rope_scaling=_LLAMA31_SCALING),
                   "70b": dict(d_model=8192, n_layers=80, n_heads=64, d_ff=28672)},
    ),
    "gemma2": _sizes(
        _GEMMA2, tiny=dict(_TINY, n_layers=4, n_kv_heads=2, head_dim=32, d_ff=256, query_scale=32 ** -0.5,
                           sliding_window=16),
        published={"2b": dict(d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, d_ff=9216),
                   "9b": dict(d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8, d_ff=14336),
                   # 27B: head_dim 128; query_pre_attn_scalar = d_model / n_heads = 144
                   "27b": dict(d_model=4608, n_layers=46, n_heads=32, n_kv_heads=16, head_dim=128, d_ff=36864,
                                query_scale=144 ** -0.5)},
    ),
    "mistral": _sizes(
        _MISTRAL, tiny=dict(_TINY, n_kv_heads=2, d_ff=192, sliding_window=16),
        published={"7b": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=14336)},
    ),
    "qwen2": _sizes(
        _QWEN2, tiny=dict(_TINY, n_kv_heads=2, d_ff=192),
        published={"0.5b": dict(d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864),
                   "1.5b": dict(d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, d_ff=8960),
                   "7b": dict(d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
                              vocab_size=152064, tie_embeddings=False)},
    ),
    "olmo2": _sizes(
        _OLMO2, tiny=dict(_TINY, d_ff=192),
        published={"1b": dict(d_model=2048, n_layers=16, n_heads=16, d_ff=8192),  # OLMo-2-0425-1B
                   "7b": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=11008),
                   "13b": dict(d_model=5120, n_layers=40, n_heads=40, d_ff=13824)},
    ),
    "gpt_neox": _sizes(
        _GPT_NEOX, tiny=dict(_TINY),
        published={"pythia-160m": dict(d_model=768, n_layers=12, n_heads=12),
                   "pythia-1.4b": dict(d_model=2048, n_layers=24, n_heads=16),
                   "20b": dict(d_model=6144, n_layers=44, n_heads=64, vocab_size=50432)},
    ),
    "palm": _sizes(
        _PALM, tiny=dict(_TINY, head_dim=16, d_ff=256),
        published={"8b": dict(d_model=4096, n_layers=32, n_heads=16, d_ff=16384),
                   "62b": dict(d_model=8192, n_layers=64, n_heads=32, d_ff=32768),
                   "540b": dict(d_model=18432, n_layers=118, n_heads=48, d_ff=73728)},
    ),
    "modern": _sizes(
        _MODERN, tiny=dict(_TINY, d_model=128, n_kv_heads=2, d_ff_multiple_of=32, max_seq_len=512),
        # d_ff from the 8/3 rule rounded up to 256: 5632 (1b), 11008 (7b, as Llama 2 7B)
        published={"1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=4),
                   "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8)},
    ),
}

ALIASES: dict[str, dict[str, str]] = {
    "gpt2": {"small": "124m", "medium": "355m", "large": "774m", "xl": "1.5b"},
}


def names() -> tuple[str, ...]:
    """The preset families."""
    return tuple(PRESETS)


def sizes(family: str) -> tuple[str, ...]:
    """The sizes of one family, tiny first."""
    return tuple(_family(family))


def get(family: str, size: str = "tiny") -> ModelConfig:
    """The config of `family` at `size`; unknown names raise ValueError listing the valid ones."""
    table = _family(family)
    size = ALIASES.get(family, {}).get(size, size)
    if size not in table:
        raise ValueError(f"unknown size {size!r} for preset family {family!r}: expected one of "
                         + ", ".join(table))
    return table[size]


def _family(family: str) -> dict[str, ModelConfig]:
    if family not in PRESETS:
        raise ValueError(f"unknown preset family {family!r}: expected one of " + ", ".join(PRESETS))
    return PRESETS[family]
