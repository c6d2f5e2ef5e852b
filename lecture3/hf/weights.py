"""Tensor names and layouts: one list of two-way rules per family maps HF tensors onto lecture3 params.

A rule is (HF name, lecture3 paths, load, save): `load` turns the HF tensor into the lecture3 arrays,
`save` the lecture3 arrays back into the HF tensor; fused tensors (GPT-2's c_attn, GPT-NeoX's
query_key_value) map one HF name onto the three paths q, k, v. lecture3 paths are "/"-joined keys of the
unscanned params tree ("layer_3/attn/q").

Arrays are numpy: layout changes happen on the host, with no device dispatch per tensor. torch Linear
weights are [out, in]; GPT-2's Conv1D weights are [in, out]; lecture3 keeps q/k/v as [D, heads, H], o as
[N, H, D] and MLP matrices as [D, F] / [F, D].

Every RoPE family on the Hub rotates pairs (i, i + H/2) ("half"); a `rope_layout="interleaved"` config is
the same function once q's and k's head dims are permuted, so its rules permute them on the way out and
back (`rope_permutation`, as transformers' convert_llama_weights_to_hf does for Meta's checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lecture3.config import ModelConfig
from lecture3.hf.families import Family
from lecture3.layers.positions import rope_permutation

Rule = tuple[str, tuple[str, ...], Callable, Callable]


def same(name: str, path: str) -> Rule:
    return name, (path,), lambda w: (w,), lambda w: w


def transposed(name: str, path: str) -> Rule:
    """A torch Linear [out, in] <-> lecture3 [in, out]."""
    return name, (path,), lambda w: (w.T,), lambda w: w.T


def gain(name: str, path: str, offset: float) -> Rule:
    """A norm gain; Gemma stores w with gain = 1 + w, so its offset is 1."""
    return name, (path,), lambda w: (w + offset,), lambda g: g - offset


def reshaped(name: str, path: str, shape: tuple[int, ...], transpose: bool) -> Rule:
    """HF [out, in] (transposed first) or flat [out] <-> lecture3 `shape` (e.g. [D, N, H], [N, H])."""
    if transpose:
        return name, (path,), lambda w: (w.T.reshape(shape),), lambda w: w.reshape(shape[0], -1).T
    flat = (-1,) if len(shape) == 2 else (-1, shape[-1])
    return name, (path,), lambda w: (w.reshape(shape),), lambda w: w.reshape(flat)


def norm(cfg: ModelConfig, hf: str, ours: str, offset: float = 0.0) -> list[Rule]:
    out = [gain(f"{hf}.weight", f"{ours}/scale", offset)] if cfg.norm_scale else []
    if cfg.norm_bias:
        out.append(same(f"{hf}.bias", f"{ours}/bias"))
    return out


def llama_layer(family: Family, cfg: ModelConfig, p: str, o: str) -> list[Rule]:
    """Llama, Mistral, Qwen2, OLMo 2 and Gemma 2: separate q/k/v/o and gate/up/down projections."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim
    a, m = f"{p}self_attn.", f"{p}mlp."
    rules = [reshaped(f"{a}q_proj.weight", f"{o}attn/q", (d, n, h), True),
             reshaped(f"{a}k_proj.weight", f"{o}attn/k", (d, k, h), True),
             reshaped(f"{a}v_proj.weight", f"{o}attn/v", (d, k, h), True),
             # o_proj [D, N*H] -> [N*H, D] -> [N, H, D]
             (f"{a}o_proj.weight", (f"{o}attn/o",), lambda w: (w.T.reshape(n, h, d),),
              lambda w: w.reshape(n * h, d).T)]
    if cfg.qkv_bias:
        rules += [reshaped(f"{a}{x}_proj.bias", f"{o}attn/{x}_bias", (heads, h), False)
                  for x, heads in (("q", n), ("k", k), ("v", k))]
    if cfg.attn_out_bias:
        rules.append(same(f"{a}o_proj.bias", f"{o}attn/o_bias"))
    if cfg.qk_norm is not None:  # OLMo 2: RMSNorm gains over the whole q / k projection
        rules += [same(f"{a}q_norm.weight", f"{o}attn/q_norm"), same(f"{a}k_norm.weight", f"{o}attn/k_norm")]
    names = ("gate", "up", "down") if cfg.gated else ("up", "down")
    rules += [transposed(f"{m}{x}_proj.weight", f"{o}mlp/{x}") for x in names]
    if cfg.mlp_bias:
        rules += [same(f"{m}{x}_proj.bias", f"{o}mlp/{x}_bias") for x in names]
    offset = 1.0 if family.name == "gemma2" else 0.0
    norms = {"pre": (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")),
             "post_branch": (("post_attention_layernorm", "attn_norm"), ("post_feedforward_layernorm", "mlp_norm")),
             "sandwich": (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_post_norm"),
                          ("pre_feedforward_layernorm", "mlp_norm"),
                          ("post_feedforward_layernorm", "mlp_post_norm"))}[cfg.norm_position]
    for theirs, ours in norms:
        rules += norm(cfg, p + theirs, o + ours, offset)
    return rules


def gpt2_layer(family: Family, cfg: ModelConfig, p: str, o: str) -> list[Rule]:
    """Conv1D weights are [in, out]; c_attn fuses q, k, v along its output axis."""
    d, n, h = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
    qkv = tuple(f"{o}attn/{x}" for x in "qkv")
    rules = [
        (f"{p}attn.c_attn.weight", qkv, lambda w: tuple(w.reshape(d, 3, n, h).transpose(1, 0, 2, 3)),
         lambda q, k, v: np.stack([q, k, v], axis=1).reshape(d, 3 * n * h)),
        (f"{p}attn.c_attn.bias", tuple(x + "_bias" for x in qkv), lambda b: tuple(b.reshape(3, n, h)),
         lambda q, k, v: np.stack([q, k, v]).reshape(-1)),
        reshaped(f"{p}attn.c_proj.weight", f"{o}attn/o", (n, h, d), False),
        same(f"{p}attn.c_proj.bias", f"{o}attn/o_bias"),
        same(f"{p}mlp.c_fc.weight", f"{o}mlp/up"), same(f"{p}mlp.c_fc.bias", f"{o}mlp/up_bias"),
        same(f"{p}mlp.c_proj.weight", f"{o}mlp/down"), same(f"{p}mlp.c_proj.bias", f"{o}mlp/down_bias"),
    ]
    return rules + norm(cfg, p + "ln_1", o + "attn_norm") + norm(cfg, p + "ln_2", o + "mlp_norm")


def gpt_neox_layer(family: Family, cfg: ModelConfig, p: str, o: str) -> list[Rule]:
    """query_key_value is a Linear whose output is interleaved per head: [N, (q, k, v), H]."""
    d, n, h = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
    qkv = tuple(f"{o}attn/{x}" for x in "qkv")
    rules = [
        # [N*3*H, D] -> [N, 3, H, D] -> three [D, N, H]
        (f"{p}attention.query_key_value.weight", qkv,
         lambda w: tuple(w.reshape(n, 3, h, d).transpose(1, 3, 0, 2)),
         lambda q, k, v: np.stack([q, k, v]).transpose(2, 0, 3, 1).reshape(3 * n * h, d)),
        (f"{p}attention.dense.weight", (f"{o}attn/o",), lambda w: (w.T.reshape(n, h, d),),
         lambda w: w.reshape(n * h, d).T),
        transposed(f"{p}mlp.dense_h_to_4h.weight", f"{o}mlp/up"),
        transposed(f"{p}mlp.dense_4h_to_h.weight", f"{o}mlp/down"),
        same(f"{p}mlp.dense_h_to_4h.bias", f"{o}mlp/up_bias"),
        same(f"{p}mlp.dense_4h_to_h.bias", f"{o}mlp/down_bias"),
    ]
    if cfg.qkv_bias:
        rules.append((f"{p}attention.query_key_value.bias", tuple(x + "_bias" for x in qkv),
                      lambda b: tuple(b.reshape(n, 3, h).transpose(1, 0, 2)),
                      lambda q, k, v: np.stack([q, k, v], axis=1).reshape(-1)))
    if cfg.attn_out_bias:
        rules.append(same(f"{p}attention.dense.bias", f"{o}attn/o_bias"))
    return (rules + norm(cfg, p + "input_layernorm", o + "attn_norm")
            + norm(cfg, p + "post_attention_layernorm", o + "mlp_norm"))


# layout -> (embedding, position table, final norm, untied head, layer prefix, layer rules)
LAYOUTS = {
    "llama": ("model.embed_tokens.weight", None, "model.norm", "lm_head.weight", "model.layers.{}.", llama_layer),
    "gpt2": ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f", "lm_head.weight",
             "transformer.h.{}.", gpt2_layer),
    "gpt_neox": ("gpt_neox.embed_in.weight", None, "gpt_neox.final_layer_norm", "embed_out.weight",
                 "gpt_neox.layers.{}.", gpt_neox_layer),
}

# Buffers some checkpoints carry that hold no parameters (causal masks, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
                    ".rotary_emb.inv_freq")


# lecture3 params whose last axis is (a multiple of) q's or k's head dims, in RoPE's pairing
ROTATED = ("q", "k", "q_bias", "k_bias", "q_norm", "k_norm", "q_norm_bias", "k_norm_bias")


def to_half_layout(rule: Rule, perm: np.ndarray) -> Rule:
    """`rule` with q/k arrays taken from lecture3's interleaved head dims to HF's half layout (and back)."""
    name, paths, load, save = rule
    hit = [p.split("/")[-2:-1] == ["attn"] and p.rsplit("/", 1)[-1] in ROTATED for p in paths]
    if not any(hit):
        return rule
    back = np.argsort(perm)

    def take(a, idx):  # [..., heads * H] or [..., heads, H]: reorder each head's H dims
        return a.reshape(*a.shape[:-1], -1, len(idx))[..., idx].reshape(a.shape)

    return (name, paths, lambda w: tuple(take(a, back) if h else a for a, h in zip(load(w), hit, strict=True)),
            lambda *arrs: save(*(take(a, perm) if h else a for a, h in zip(arrs, hit, strict=True))))


def rules(family: Family, cfg: ModelConfig) -> list[Rule]:
    """Every tensor of this family's checkpoint for `cfg`, with where it lives in lecture3's params."""
    embed, table, final, head, prefix, layer = LAYOUTS[family.layout]
    out = [same(embed, "embed")]
    if table is not None:
        out.append(same(table, "pos_embed"))
    if cfg.has_final_norm:
        out += norm(cfg, final, "final_norm", 1.0 if family.name == "gemma2" else 0.0)
    if not cfg.tie_embeddings:
        out.append(transposed(head, "head"))
    for i in range(cfg.n_layers):
        out += layer(family, cfg, prefix.format(i), f"layer_{i}/")
    if cfg.position == "rope" and cfg.rope_layout == "interleaved":
        h = cfg.resolved_head_dim
        perm = rope_permutation(h, int(h * cfg.rope_fraction))
        out = [to_half_layout(r, perm) for r in out]
    return out


def head_name(family: Family) -> str:
    return LAYOUTS[family.layout][3]
