"""The seven Hugging Face families as config translations: HF config object <-> ModelConfig fields.

Each family has `to_lecture3(hf) -> dict` (ModelConfig fields; raises HFError on an HF feature lecture3
cannot compute) and `to_hf(cfg) -> dict` (arguments of the HF config class). `to_hf` is a best effort:
whether a lecture3 config is expressible is decided by translating it back (`mismatches`), so the two
directions can never disagree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from lecture3.config import ModelConfig, RopeScaling, fields_of_kind
from lecture3.hf.errors import HFError, require

# HF activation name -> lecture3, for plain MLPs (GPT-2, GPT-NeoX) and gated ones (gate_proj/up_proj).
PLAIN_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
              "silu": "silu", "swish": "silu", "relu2": "relu2"}
GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh",
              "gelu_new": "geglu_tanh", "relu": "reglu"}
PLAIN_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu", "relu2": "relu2"}
GATED_TO_HF = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh", "reglu": "relu"}

# Fields that are not part of the function a checkpoint computes: runtime, numerics and training choices
# (every field that config.py does not describe as "architecture").
RUNTIME_FIELDS = fields_of_kind(ModelConfig, "implementation", "training")


def unsupported(family: str, field: str, value: Any, why: str) -> HFError:
    return HFError(f"{family} config {field}={value!r} cannot be loaded: {why}")


def _act(family: str, field: str, name: str, table: dict) -> str:
    if name not in table:
        raise unsupported(family, field, name, "lecture3 implements " + ", ".join(sorted(table)))
    return table[name]


def _rope(family: str, hf, partial: bool = False) -> dict:
    """rope_theta / rope_fraction / rope_scaling from transformers' standardised `rope_parameters`.

    Only GPT-NeoX's modeling code rotates part of each head; the others ignore `partial_rotary_factor`.
    """
    p = dict(hf.rope_parameters or {})
    nested = [k for k in p if k in (getattr(hf, "layer_types", None) or ())]
    if nested:  # one dict per layer type: fine only when they agree
        first = p[nested[0]]
        if any(p[k] != first for k in nested):
            raise unsupported(family, "rope_parameters", p, "lecture3 uses one RoPE for all layers")
        p = dict(first)
    kind = p.get("rope_type", "default")
    scaling = None
    if kind == "llama3":
        scaling = RopeScaling(factor=p["factor"], low_freq_factor=p["low_freq_factor"],
                              high_freq_factor=p["high_freq_factor"],
                              original_max_position=p["original_max_position_embeddings"])
    elif kind != "default":
        raise unsupported(family, "rope_parameters.rope_type", kind, "lecture3 implements 'default' and 'llama3'")
    return dict(position="rope", rope_theta=float(p["rope_theta"]),
                rope_fraction=float(p.get("partial_rotary_factor", 1.0)) if partial else 1.0, rope_scaling=scaling)


def _rope_to_hf(cfg: ModelConfig, partial: bool = False) -> dict:
    p: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if partial:
        p["partial_rotary_factor"] = cfg.rope_fraction
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        p.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                 high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_position)
    return {"rope_parameters": p}


def _windows(family: str, kinds: list[str], window: int | None) -> dict:
    """HF per-layer `layer_types` + one `sliding_window` -> the shortest repeating `layer_pattern`."""
    for kind in kinds:
        if kind not in ("full_attention", "sliding_attention"):
            raise unsupported(family, "layer_types", kind, "lecture3 has 'full_attention' and 'sliding_attention'")
    local = ["local" if k == "sliding_attention" else "global" for k in kinds]
    if window is None or "local" not in local:
        return dict(layer_pattern=("global",), sliding_window=None)
    period = next(p for p in range(1, len(local) + 1)
                  if len(local) % p == 0 and local == local[:p] * (len(local) // p))
    return dict(layer_pattern=tuple(local[:period]), sliding_window=window)


def _layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.n_layers)]


def _sizes(hf) -> dict:
    """The sizes every Llama-like HF config spells the same way."""
    return dict(vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
                n_heads=hf.num_attention_heads, n_kv_heads=getattr(hf, "num_key_value_heads", None),
                head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                d_ff=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
                tie_embeddings=hf.tie_word_embeddings)


def _sizes_to_hf(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.resolved_n_kv_heads,
                head_dim=cfg.resolved_head_dim, intermediate_size=cfg.resolved_d_ff,
                max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                rms_norm_eps=cfg.norm_eps, attention_dropout=0.0)


# ----- the families -----

def gpt2_to_lecture3(hf) -> dict:
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if getattr(hf, flag, False):
            raise unsupported("GPT-2", flag, True, "lecture3 has no such attention")
    return dict(vocab_size=hf.vocab_size, d_model=hf.n_embd, n_layers=hf.n_layer, n_heads=hf.n_head,
                d_ff=hf.n_inner or 4 * hf.n_embd, max_seq_len=hf.n_positions, norm="layernorm",
                norm_bias=True, norm_eps=hf.layer_norm_epsilon, qkv_bias=True, attn_out_bias=True,
                mlp_bias=True, activation=_act("GPT-2", "activation_function", hf.activation_function, PLAIN_ACTS),
                position="learned", query_scale=None if hf.scale_attn_weights else 1.0,
                tie_embeddings=hf.tie_word_embeddings)


def gpt2_to_hf(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_inner=cfg.resolved_d_ff, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                activation_function=PLAIN_TO_HF.get(cfg.activation, "gelu_new"),
                scale_attn_weights=cfg.query_scale != 1.0, tie_word_embeddings=cfg.tie_embeddings,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def llama_to_lecture3(hf) -> dict:
    bias = bool(hf.attention_bias)
    return dict(**_sizes(hf), norm_eps=hf.rms_norm_eps, qkv_bias=bias, attn_out_bias=bias,
                mlp_bias=bool(hf.mlp_bias), activation=_act("Llama", "hidden_act", hf.hidden_act, GATED_ACTS),
                **_rope("Llama", hf))


def llama_to_hf(cfg: ModelConfig) -> dict:
    return dict(**_sizes_to_hf(cfg), hidden_act=GATED_TO_HF.get(cfg.activation, "silu"),
                attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **_rope_to_hf(cfg))


def mistral_to_lecture3(hf) -> dict:
    window = hf.sliding_window
    return dict(**_sizes(hf), norm_eps=hf.rms_norm_eps,
                activation=_act("Mistral", "hidden_act", hf.hidden_act, GATED_ACTS), **_rope("Mistral", hf),
                layer_pattern=("global",) if window is None else ("local",), sliding_window=window)


def mistral_to_hf(cfg: ModelConfig) -> dict:
    every_local = all(cfg.window(i) for i in range(cfg.n_layers))
    return dict(**_sizes_to_hf(cfg), hidden_act=GATED_TO_HF.get(cfg.activation, "silu"),
                sliding_window=cfg.sliding_window if every_local else None, **_rope_to_hf(cfg))


def qwen2_to_lecture3(hf) -> dict:
    return dict(**_sizes(hf), norm_eps=hf.rms_norm_eps, qkv_bias=True,
                activation=_act("Qwen2", "hidden_act", hf.hidden_act, GATED_ACTS), **_rope("Qwen2", hf),
                **_windows("Qwen2", hf.layer_types, hf.sliding_window))


def qwen2_to_hf(cfg: ModelConfig) -> dict:
    return dict(**_sizes_to_hf(cfg), hidden_act=GATED_TO_HF.get(cfg.activation, "silu"),
                use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                layer_types=_layer_types(cfg), max_window_layers=0, **_rope_to_hf(cfg))


def olmo2_to_lecture3(hf) -> dict:
    bias = bool(hf.attention_bias)
    return dict(**_sizes(hf), norm_eps=hf.rms_norm_eps, norm_position="post_branch", qk_norm="full",
                qkv_bias=bias, attn_out_bias=bias,
                activation=_act("OLMo 2", "hidden_act", hf.hidden_act, GATED_ACTS), **_rope("OLMo 2", hf))


def olmo2_to_hf(cfg: ModelConfig) -> dict:
    return dict(**_sizes_to_hf(cfg), hidden_act=GATED_TO_HF.get(cfg.activation, "silu"),
                attention_bias=cfg.qkv_bias, **_rope_to_hf(cfg))


def gemma2_to_lecture3(hf) -> dict:
    if getattr(hf, "use_bidirectional_attention", None):
        raise unsupported("Gemma 2", "use_bidirectional_attention", True, "lecture3 attention is causal")
    bias = bool(hf.attention_bias)
    return dict(**_sizes(hf), norm_eps=hf.rms_norm_eps, norm_position="sandwich", qkv_bias=bias,
                attn_out_bias=bias, scale_embeddings=True, query_scale=float(hf.query_pre_attn_scalar) ** -0.5,
                attn_logit_softcap=hf.attn_logit_softcapping, final_logit_softcap=hf.final_logit_softcapping,
                activation=_act("Gemma 2", "hidden_activation", hf.hidden_activation, GATED_ACTS),
                **_rope("Gemma 2", hf), **_windows("Gemma 2", hf.layer_types, hf.sliding_window))


def gemma2_to_hf(cfg: ModelConfig) -> dict:
    scale = cfg.query_scale if cfg.query_scale is not None else cfg.resolved_head_dim ** -0.5
    scalar = scale ** -2  # an int in HF's config; a scale that is not 1/sqrt(int) fails the check
    return dict(**_sizes_to_hf(cfg), hidden_activation=GATED_TO_HF.get(cfg.activation, "gelu_pytorch_tanh"),
                attention_bias=cfg.qkv_bias, query_pre_attn_scalar=max(1, round(scalar)),
                attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
                # HF always builds the sliding mask, so it needs a window even when no layer uses one
                sliding_window=cfg.sliding_window or cfg.max_seq_len, layer_types=_layer_types(cfg),
                **_rope_to_hf(cfg))


def gpt_neox_to_lecture3(hf) -> dict:
    bias = bool(hf.attention_bias)
    parallel = bool(hf.use_parallel_residual)
    return dict(vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
                n_heads=hf.num_attention_heads, d_ff=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
                norm="layernorm", norm_bias=True, norm_eps=hf.layer_norm_eps, qkv_bias=bias, attn_out_bias=bias,
                mlp_bias=True, activation=_act("GPT-NeoX", "hidden_act", hf.hidden_act, PLAIN_ACTS),
                block="parallel" if parallel else "serial", parallel_norm="separate" if parallel else "shared",
                tie_embeddings=hf.tie_word_embeddings, **_rope("GPT-NeoX", hf, partial=True))


def gpt_neox_to_hf(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, intermediate_size=cfg.resolved_d_ff,
                max_position_embeddings=cfg.max_seq_len, layer_norm_eps=cfg.norm_eps,
                hidden_act=PLAIN_TO_HF.get(cfg.activation, "gelu"), attention_bias=cfg.qkv_bias,
                use_parallel_residual=cfg.block == "parallel", tie_word_embeddings=cfg.tie_embeddings,
                attention_dropout=0.0, hidden_dropout=0.0, **_rope_to_hf(cfg, partial=True))


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face model family: its names, its config translations and its tensor layout."""

    name: str  # HF model_type, also the `family=` argument of save_pretrained
    title: str
    architecture: str  # the CausalLM class named in config.json
    config_class: str
    layout: str  # "gpt2", "llama" or "gpt_neox": how tensors are named and fused (see weights.py)
    to_lecture3: Callable[[Any], dict]
    to_hf: Callable[[ModelConfig], dict]


FAMILIES = {f.name: f for f in (
    Family("llama", "Llama", "LlamaForCausalLM", "LlamaConfig", "llama", llama_to_lecture3, llama_to_hf),
    Family("mistral", "Mistral", "MistralForCausalLM", "MistralConfig", "llama", mistral_to_lecture3,
           mistral_to_hf),
    Family("qwen2", "Qwen2", "Qwen2ForCausalLM", "Qwen2Config", "llama", qwen2_to_lecture3, qwen2_to_hf),
    Family("gemma2", "Gemma 2", "Gemma2ForCausalLM", "Gemma2Config", "llama", gemma2_to_lecture3, gemma2_to_hf),
    Family("olmo2", "OLMo 2", "Olmo2ForCausalLM", "Olmo2Config", "llama", olmo2_to_lecture3, olmo2_to_hf),
    Family("gpt2", "GPT-2", "GPT2LMHeadModel", "GPT2Config", "gpt2", gpt2_to_lecture3, gpt2_to_hf),
    Family("gpt_neox", "GPT-NeoX", "GPTNeoXForCausalLM", "GPTNeoXConfig", "gpt_neox", gpt_neox_to_lecture3,
           gpt_neox_to_hf),
)}  # in the order save_pretrained tries them when no family is named


def hf_config(family: Family, cfg: ModelConfig):
    """The transformers config object for `cfg` (best effort; see `mismatches`)."""
    transformers = require("transformers")
    kwargs = family.to_hf(cfg)
    cls = getattr(transformers, family.config_class)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # defaults may lie outside a small vocab:
        value = kwargs.get(name, getattr(cls, name, None))      # None before transformers warns about it
        if isinstance(value, int) and value >= cfg.vocab_size:
            kwargs[name] = None
    try:
        hf = cls(**kwargs)
    except Exception as e:  # transformers validates its configs (strict dataclasses)
        raise HFError(f"{family.title} cannot express this config: transformers rejects it ({e})") from e
    hf.architectures = [family.architecture]
    return hf


def canonical(cfg: ModelConfig) -> dict:
    """The fields that decide what the model computes, with every default resolved."""
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RUNTIME_FIELDS}
    d.update(n_kv_heads=cfg.resolved_n_kv_heads, head_dim=cfg.resolved_head_dim, d_ff=cfg.resolved_d_ff,
             query_scale=cfg.query_scale if cfg.query_scale is not None else cfg.resolved_head_dim ** -0.5,
             windows=tuple(cfg.window(i) for i in range(cfg.n_layers)))  # the pattern, unrolled
    for name in ("d_ff_multiple_of", "layer_pattern", "sliding_window", "relative_buckets", "relative_max_distance"):
        d.pop(name)
    d.pop("rope_layout")  # a permutation of q/k head dims: weights.rules saves either layout as HF's "half"
    if cfg.position != "rope":
        for name in ("rope_theta", "rope_fraction", "rope_scaling"):
            d.pop(name)
    if cfg.block != "parallel":
        d.pop("parallel_norm")
    return d


def mismatches(family: Family, cfg: ModelConfig) -> list[str]:
    """What of `cfg` the family cannot express: 'field=ours (family has theirs)' for each difference."""
    try:
        back = ModelConfig(**family.to_lecture3(hf_config(family, cfg)))
    except ValueError as e:
        return [str(e)]
    ours, theirs = canonical(cfg), canonical(back)
    out = []
    for name, value in ours.items():
        other = theirs.get(name)
        same = (math.isclose(value, other, rel_tol=1e-6) if isinstance(value, float) and isinstance(other, float)
                else value == other)
        if not same:
            out.append(f"{name}={value!r} ({family.title} gives {other!r})")
    return out
