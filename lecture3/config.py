"""Frozen, validated configuration: every architecture choice of the lecture is one field.

`None` means "off". Invalid values or combinations raise `ConfigError` (a `Lecture3Error`, so a
`ValueError`) at construction, naming the field, the value and what is allowed, so no bad config ever
reaches `jit`; ModelConfig's checks are the small `_check_*` functions of `MODEL_CHECKS`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Literal

from lecture3.data.config import DataConfig
from lecture3.errors import Lecture3Error
from lecture3.loss_spec import LossSpecError, parse_terms

Norm = Literal["layernorm", "rmsnorm", "none"]
NormPosition = Literal["pre", "post", "sandwich", "post_branch"]
Activation = Literal["relu", "gelu", "gelu_tanh", "silu", "relu2", "reglu", "geglu", "geglu_tanh", "swiglu"]
Block = Literal["serial", "parallel"]
ParallelNorm = Literal["shared", "separate"]
Position = Literal["sinusoidal", "learned", "rope", "alibi", "relative", "none"]
QKNorm = Literal["per_head", "full"]
LayerKind = Literal["global", "local"]
RopeLayout = Literal["half", "interleaved"]
DType = Literal["float32", "bfloat16", "float16"]
Remat = Literal["full", "dots", "dots_no_batch"]
AttentionImpl = Literal["dense", "chunked", "cudnn"]

GATED_ACTIVATIONS = ("reglu", "geglu", "geglu_tanh", "swiglu")


# ----- each field described once: its kind, its one-line help (with its source), and its choices (the Literal
# type); validation, CLI help (flags.py), hf's RUNTIME_FIELDS, experiment keys and the sweep test read these

Kind = Literal["architecture", "implementation", "training"]
KINDS: dict[str, str] = {
    "architecture": "changes the function the model computes",
    "implementation": "only how it is computed or stored: same maths (a checkpoint loads with any value)",
    "training": "how the model is trained (init, dropout, data): not part of a trained checkpoint's function",
}


def option(default, kind: Kind, help: str):
    """A config field with its description in `metadata`: its kind and its one-line help. (A field added to a
    config keeps the experiment records at its default without saying so: `experiment.key_fields`.)"""
    assert kind in KINDS and help, (kind, help)
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help})


def arch(default, help: str):
    """A field that changes the maths (see `option`)."""
    return option(default, "architecture", help)


def impl(default, help: str):
    """A field that changes only how the same maths is computed (see `option`)."""
    return option(default, "implementation", help)


def training(default, help: str):
    """A field of how a model is trained, or of a run (see `option`)."""
    return option(default, "training", help)


def kind(cls: type, name: str) -> str | None:
    """The `Kind` of a described field of the config dataclass `cls`; None for an undescribed one."""
    return {f.name: f.metadata.get("kind") for f in dataclasses.fields(cls)}[name]


def fields_of_kind(cls: type, *kinds: str) -> tuple[str, ...]:
    """The names of `cls`'s fields of any of `kinds`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("kind") in kinds)


@functools.cache
def choices(cls: type, name: str) -> tuple:
    """The values a `Literal`-typed field may hold, None last where it may be off; () for any other field."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for arg in args:
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg) + ((None,) if type(None) in args else ())
    return ()


def literal_fields(cls: type) -> tuple[str, ...]:
    """The fields of `cls` whose type names their choices (a `Literal`, possibly `| None`)."""
    return tuple(f.name for f in dataclasses.fields(cls) if choices(cls, f.name))


def _one_of(allowed: tuple) -> str:
    values = [v for v in allowed if v is not None]
    return "one of " + ", ".join(map(repr, values)) + (" or None" if None in allowed else "")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling of RoPE (long wavelengths slowed by `factor`, smooth in between)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        _check(self.factor >= 1.0, "rope_scaling.factor", self.factor, "a number >= 1")
        _check(
            0 < self.low_freq_factor < self.high_freq_factor,
            "rope_scaling.low_freq_factor",
            (self.low_freq_factor, self.high_freq_factor),
            "0 < low_freq_factor < high_freq_factor",
        )
        _check(self.original_max_position > 0, "rope_scaling.original_max_position",
               self.original_max_position, "a positive integer")


class ConfigError(Lecture3Error):
    """A config key that does not exist, or a value that no field of that name can take."""


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"ModelConfig.{field}={value!r} is invalid: expected {allowed}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One transformer architecture. Each field is one choice of the lecture; `None` is off."""

    # --- sizes ---
    vocab_size: int = arch(259, "vocabulary size; 259 is the byte tokenizer's 256 bytes + specials")
    d_model: int = arch(256, "width of the residual stream")
    n_layers: int = arch(4, "number of blocks")
    n_heads: int = arch(4, "query heads")
    n_kv_heads: int | None = arch(None, "None = n_heads (MHA); 1 = MQA (Shazeer 2019); divisor = GQA (Ainslie 2023)")
    head_dim: int | None = arch(None, "None = d_model / n_heads (the consensus); Gemma decouples it")
    d_ff: int | None = arch(None, "None = 4 d_model (plain) or 8/3 d_model rounded up (gated), Shazeer 2020")
    d_ff_multiple_of: int = arch(64, "gated default d_ff is rounded up to a multiple of this (Llama uses 256)")
    max_seq_len: int = arch(1024, "longest sequence; sizes learned / sinusoidal tables")

    # --- normalisation ---
    norm: Norm = arch("rmsnorm", "RMSNorm (Zhang & Sennrich 2019) vs LayerNorm (Ba 2016)")
    norm_position: NormPosition = arch("pre", "pre (GPT-2), post (Vaswani 2017), sandwich (Gemma 2), "
                                              "post_branch (OLMo 2)")
    norm_scale: bool = arch(True, "learnable gain")
    norm_bias: bool = arch(False, "learnable bias on LayerNorm (GPT-2 yes, modern models no)")
    norm_eps: float = arch(1e-5, "epsilon added to the variance (mean square) in every norm")

    # --- biases ---
    qkv_bias: bool = arch(False, "bias on q/k/v projections (GPT-2, Qwen2)")
    attn_out_bias: bool = arch(False, "bias on the attention output projection (GPT-2)")
    mlp_bias: bool = arch(False, "bias on MLP projections (GPT-2)")

    # --- feed-forward ---
    activation: Activation = arch("swiglu", "gated linear units (Shazeer 2020); relu2 = squared ReLU (So 2021)")

    # --- block layout ---
    block: Block = arch("serial", "parallel attention + MLP (GPT-J, GPT-NeoX, PaLM)")
    parallel_norm: ParallelNorm = arch("shared", "parallel block: one input norm (GPT-J, PaLM) or two (GPT-NeoX)")

    # --- positions ---
    position: Position = arch("rope", "RoPE (Su 2021); ALiBi (Press 2021); relative = T5 buckets (Raffel 2020)")
    rope_theta: float = arch(10_000.0, "RoPE base wavelength (Llama 3: 500000)")
    rope_fraction: float = arch(1.0, "share of each head that RoPE rotates (GPT-NeoX rotates 25%)")
    rope_scaling: RopeScaling | None = arch(None, "Llama-3 frequency scaling for long context")
    rope_layout: RopeLayout = arch("half", "pairs (i, i+H/2): GPT-NeoX, HF; (2i, 2i+1): RoFormer, GPT-J, Meta Llama")
    relative_buckets: int = arch(32, "T5 relative-position buckets")
    relative_max_distance: int = arch(128, "T5: distances past this share the last bucket")

    # --- attention ---
    query_scale: float | None = arch(None, "None = 1/sqrt(head_dim); Gemma 2 uses 1/sqrt(query_pre_attn_scalar)")
    qk_norm: QKNorm | None = arch(None, "norm q and k before the dot product (Dehghani 2023; OLMo 2 \"full\")")
    attn_logit_softcap: float | None = arch(None, "cap * tanh(logits / cap) on attention logits (Gemma 2: 50)")
    sliding_window: int | None = arch(None, "a local layer sees the last `sliding_window` keys (Mistral, Gemma 2)")
    layer_pattern: tuple[LayerKind, ...] = arch(("global",), "repeated over layers; Gemma 2 (\"local\", \"global\")")
    document_mask: bool = training(False, "with segment ids, attention stays inside each packed document")
    attention_impl: AttentionImpl = impl(
        "dense", "how attention is computed, same maths: dense (T x S logits; a local layer's keys in blocks of "
        "its window), chunked (query and key chunks with an online softmax: memory bounded, long global layers), "
        "cudnn (jax.nn.dot_product_attention: cuDNN's fused kernel on a GPU, its XLA path elsewhere)")
    attention_chunk: int = impl(512, "chunked: queries and keys per chunk")

    # --- embeddings and head ---
    tie_embeddings: bool = arch(True, "head shares the embedding matrix (GPT-2, Gemma)")
    scale_embeddings: bool = arch(False, "multiply embeddings by sqrt(d_model) (Gemma)")
    final_logit_softcap: float | None = arch(None, "cap * tanh(logits / cap) on output logits (Gemma 2: 30)")
    init_std: float = training(0.02, "standard deviation of the normal initialisation (GPT-2: 0.02)")

    # --- regularisation (the lecture: dropout has disappeared from pre-training) ---
    embed_dropout: float | None = training(None, "dropout on the embeddings")
    resid_dropout: float | None = training(None, "on each branch output before the residual add")
    attn_dropout: float | None = training(None, "on attention probabilities")

    # --- numerics and compilation ---
    param_dtype: DType = impl("float32", "storage dtype of the parameters")
    dtype: DType = impl("float32", "compute dtype of matmuls and of the residual stream; softmax, norms, logits f32")
    scan_layers: bool = impl(False, "nn.scan over layers: compile time independent of depth")
    remat: Remat | None = impl(None, "rematerialisation policy for each layer")

    def __post_init__(self):
        if isinstance(self.layer_pattern, list):
            object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for check in MODEL_CHECKS:
            check(self)

    # ----- derived sizes -----
    @property
    def resolved_n_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if not self.gated:
            return 4 * self.d_model
        m = self.d_ff_multiple_of
        return m * math.ceil(8 * self.d_model / 3 / m)

    @property
    def has_dropout(self) -> bool:
        return any(rate is not None for rate in (self.embed_dropout, self.resid_dropout, self.attn_dropout))

    @property
    def has_final_norm(self) -> bool:
        """Post-norm already normalises the stream after the last block; every other position needs one."""
        return self.norm != "none" and self.norm_position != "post"

    def layer_kind(self, layer: int) -> LayerKind:
        return self.layer_pattern[layer % len(self.layer_pattern)]

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_kind(layer) == "local" else None

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"ModelConfig has no field(s) {unknown}; remove them or check the spelling")
        return cls(**d)


# ----- ModelConfig's checks: each raises ConfigError naming the field, its value and what is allowed ------


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_choices(c: ModelConfig) -> None:
    """Every Literal-typed field holds one of its values (None where the field may be off)."""
    for name in literal_fields(ModelConfig):
        value = getattr(c, name)
        _check(value in choices(ModelConfig, name), name, value, _one_of(choices(ModelConfig, name)))


def _check_types(c: ModelConfig) -> None:
    """From each field's type: an `int` is a positive integer (an `int | None` may be None), a `bool` a bool."""
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if f.type in ("int", int):
            _check(_positive_int(value), f.name, value, "a positive integer")
        elif f.type in ("int | None", int | None):
            _check(value is None or _positive_int(value), f.name, value, "a positive integer or None")
        elif f.type in ("bool", bool):
            _check(isinstance(value, bool), f.name, value, "True or False")


def _check_heads(c: ModelConfig) -> None:
    if c.n_kv_heads is not None:
        _check(c.n_heads % c.n_kv_heads == 0, "n_kv_heads", c.n_kv_heads,
               f"a divisor of n_heads={c.n_heads} (n_heads for MHA, 1 for MQA)")
    if c.head_dim is None:
        _check(c.d_model % c.n_heads == 0, "n_heads", c.n_heads,
               f"a divisor of d_model={c.d_model}, or set head_dim explicitly")


def _check_norms(c: ModelConfig) -> None:
    _check(c.norm_eps > 0, "norm_eps", c.norm_eps, "a positive number")
    _check(not (c.norm_bias and c.norm != "layernorm"), "norm_bias", c.norm_bias,
           f"False with norm={c.norm!r} (only LayerNorm has a bias)")
    _check(not (c.norm == "none" and c.qk_norm is not None), "qk_norm", c.qk_norm,
           "None when norm='none' (qk_norm uses the model's norm)")
    _check(not (c.norm == "none" and c.norm_position != "pre"), "norm_position",
           c.norm_position, "'pre' when norm='none' (there is no norm to place)")
    _check(not (c.block == "parallel" and c.norm_position != "pre"), "norm_position",
           c.norm_position, "'pre' with block='parallel' (GPT-J/NeoX/PaLM parallel blocks are pre-norm)")
    _check(not (c.block == "serial" and c.parallel_norm != "shared"), "parallel_norm",
           c.parallel_norm, "'shared' with block='serial' (only a parallel block has a second input norm)")


def _check_rope(c: ModelConfig) -> None:
    _check(c.rope_theta > 0, "rope_theta", c.rope_theta, "a positive number")
    _check(0.0 < c.rope_fraction <= 1.0, "rope_fraction", c.rope_fraction, "a number in (0, 1]")
    rotary = int(c.resolved_head_dim * c.rope_fraction)
    _check(c.position != "rope" or (rotary >= 2 and rotary % 2 == 0), "rope_fraction",
           c.rope_fraction, f"a fraction giving an even number >= 2 of rotated dims of head_dim="
           f"{c.resolved_head_dim} (got {rotary})")
    _check(c.position == "rope" or c.rope_fraction == 1.0, "rope_fraction", c.rope_fraction,
           f"1.0 with position={c.position!r} (it is the share of each head that RoPE rotates)")
    _check(c.position == "rope" or c.rope_scaling is None, "rope_scaling", c.rope_scaling,
           f"None with position={c.position!r} (it scales RoPE only)")
    _check(c.position == "rope" or c.rope_layout == "half", "rope_layout", c.rope_layout,
           f"'half' with position={c.position!r} (it is how RoPE pairs the dims it rotates)")
    _check(c.rope_scaling is None or isinstance(c.rope_scaling, RopeScaling), "rope_scaling",
           c.rope_scaling, "a RopeScaling or None")


def _check_other_positions(c: ModelConfig) -> None:
    _check(c.position != "sinusoidal" or c.d_model % 2 == 0, "d_model", c.d_model,
           "an even number with position='sinusoidal'")
    _check(c.relative_buckets >= 2, "relative_buckets", c.relative_buckets,
           "at least 2 (half are exact distances, half logarithmic)")
    _check(c.relative_max_distance > c.relative_buckets // 2, "relative_max_distance",
           c.relative_max_distance, f"more than relative_buckets // 2 = {c.relative_buckets // 2} "
           "(the exact buckets); T5's log bucketing divides by log(max_distance / that)")


def _check_scales(c: ModelConfig) -> None:
    """init_std, the optional scale and soft-caps, and the dropout rates."""
    _check(c.init_std > 0, "init_std", c.init_std, "a positive number")
    for name in ("query_scale", "attn_logit_softcap", "final_logit_softcap"):
        value = getattr(c, name)
        _check(value is None or value > 0, name, value, "a positive number or None (off)")
    for name in ("embed_dropout", "resid_dropout", "attn_dropout"):
        value = getattr(c, name)
        _check(value is None or 0.0 < value < 1.0, name, value, "a rate in (0, 1), or None (off)")


def _check_layer_pattern(c: ModelConfig) -> None:
    _check(len(c.layer_pattern) > 0 and all(k in ("global", "local") for k in c.layer_pattern),
           "layer_pattern", c.layer_pattern, "a non-empty tuple of 'global' / 'local'")
    _check(c.n_layers % len(c.layer_pattern) == 0, "layer_pattern", c.layer_pattern,
           f"a pattern whose length divides n_layers={c.n_layers}")


def _check_attention_impl(c: ModelConfig) -> None:
    """What each way of computing attention cannot express."""
    for option, value, why in (("attn_logit_softcap", c.attn_logit_softcap, "a soft-cap"),
                               ("attn_dropout", c.attn_dropout, "dropout on the probabilities"),
                               ("position", c.position if c.position == "relative" else None,
                                "T5's learned bias (its gradient)")):
        _check(not (c.attention_impl == "cudnn" and value is not None), "attention_impl", "cudnn",
               f"'dense' or 'chunked' with {option}={value!r}: jax.nn.dot_product_attention cannot "
               f"express {why}")
    _check(not (c.attention_impl == "chunked" and c.attn_dropout is not None), "attention_impl",
           "chunked", f"'dense' with attn_dropout={c.attn_dropout!r}: the chunked softmax never "
           "holds the probabilities that dropout would drop")


def _check_windows(c: ModelConfig) -> None:
    has_local = "local" in c.layer_pattern
    _check(not has_local or c.sliding_window is not None, "sliding_window", c.sliding_window,
           "a window size when layer_pattern has 'local' layers")
    _check(has_local or c.sliding_window is None, "layer_pattern", c.layer_pattern,
           "a pattern with at least one 'local' layer when sliding_window is set, e.g. ('local',)")


def _check_max_seq_len(c: ModelConfig) -> None:
    _check(c.position not in ("learned", "sinusoidal") or c.max_seq_len <= 1 << 20, "max_seq_len",
           c.max_seq_len, "at most 2**20 with a position table")


# in this order: a later check may read what an earlier one vouched for (the head_dim of the rope check)
MODEL_CHECKS = (_check_choices, _check_types, _check_heads, _check_norms, _check_rope, _check_other_positions,
                _check_scales, _check_layer_pattern, _check_attention_impl, _check_windows, _check_max_seq_len)


# ----------------------------------------------------------------------------------------------
# Training, mesh and multi-host configuration
# ----------------------------------------------------------------------------------------------

Schedule = Literal["cosine", "wsd", "constant", "inverse_sqrt"]
OnNonFinite = Literal["stop", "skip"]
WeightDecayMode = Literal["decoupled", "independent"]


def _fail(cls: str, field: str, value, allowed: str) -> None:
    raise ValueError(f"{cls}.{field}={value!r} is invalid: expected {allowed}")


def _positive_ints(obj, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(obj, name)
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            _fail(type(obj).__name__, name, v, "a positive integer")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing of one run."""

    steps: int = training(600, "optimiser steps of the run")
    batch_size: int = training(16, "global batch, in sequences")
    lr: float = training(3e-3, "peak learning rate")
    final_lr: float = training(3e-4, "learning rate at the last step (cosine, wsd, inverse_sqrt)")
    warmup_steps: int = training(60, "linear warmup from lr / warmup_steps to lr")
    schedule: Schedule = training("cosine", "wsd = warmup-stable-decay (Hu et al. 2024, MiniCPM)")
    decay_fraction: float = training(0.2, "wsd: share of the steps spent decaying at the end")
    beta1: float = training(0.9, "Adam's first-moment decay")
    beta2: float = training(0.95, "Adam's second-moment decay (0.95: GPT-3, Llama)")
    eps: float = training(1e-8, "Adam's epsilon")
    weight_decay: float | None = training(0.1, "decoupled (AdamW, Loshchilov & Hutter 2019); norms and biases excluded")
    decay_embeddings: bool = training(False, "also decay the embedding (and tied head) matrix")
    grad_clip: float | None = training(1.0, "clip by global norm")
    weight_decay_mode: WeightDecayMode = training(
        "decoupled", "decay * lr (AdamW) or decay * lr/peak_lr (Wortsman 2023)")
    z_loss: float | None = training(None, "weight of the z-loss term mean(log^2 Z) (PaLM: 1e-4)")
    loss: str = training(
        "cross_entropy", "loss terms by name, e.g. cross_entropy+logit_l2:1e-5 (see loss_spec.TERM_ARGS)")
    loss_chunk: int | None = impl(
        None, "positions per chunk of the head and the loss terms that read logits, each chunk's logits recomputed "
              "in the backward pass: no [B, T, V] float32 logits or gradient held (cf. MaxText's vocabulary "
              "tiling); None = all at once")
    log_per_layer: bool = training(False, "also log per-layer grad norm, update/param ratio and max attention logit")
    on_nonfinite: OnNonFinite = training("stop", "a NaN/Inf loss stops the run, or that update is skipped")
    seed: int = training(0, "the init key PRNGKey(seed) and the dropout key PRNGKey(seed + 1)")
    log_every: int = training(10, "steps between logged records")
    eval_every: int = training(200, "steps between evaluations")
    eval_batches: int = training(8, "validation batches of the fixed validation set")
    checkpoint_every: int = training(200, "steps between checkpoints")
    keep_checkpoints: int = training(3, "checkpoints kept on disk")
    peak_tflops: float | None = training(
        None, "per-device dense peak in model.dtype, for MFU; None = known GPU/TPU table or CPU")
    sample_tokens: int = training(120, "tokens of text generated at the end; 0 = no sample")
    progress: bool = training(True, "the progress bar")
    allow_config_change: bool = training(False, "resume although schedule, optimiser or data-order fields changed")

    def __post_init__(self):
        _positive_ints(self, ("steps", "batch_size", "log_every", "eval_every", "eval_batches",
                              "checkpoint_every", "keep_checkpoints"))
        if not isinstance(self.sample_tokens, int) or isinstance(self.sample_tokens, bool) or self.sample_tokens < 0:
            _fail("TrainConfig", "sample_tokens", self.sample_tokens, "an integer >= 0 (0 = no sample)")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            _fail("TrainConfig", "warmup_steps", self.warmup_steps, "an integer >= 0 (a run shorter than its "
                  "warmup only warms up)")
        if not self.lr > 0:
            _fail("TrainConfig", "lr", self.lr, "a positive number")
        if not 0 <= self.final_lr <= self.lr:
            _fail("TrainConfig", "final_lr", self.final_lr, f"a number in [0, lr={self.lr}]")
        for name in literal_fields(TrainConfig):  # schedule, weight_decay_mode, on_nonfinite
            if getattr(self, name) not in choices(TrainConfig, name):
                _fail("TrainConfig", name, getattr(self, name), f"one of {choices(TrainConfig, name)}")
        if not 0 < self.decay_fraction <= 1:
            _fail("TrainConfig", "decay_fraction", self.decay_fraction, "a number in (0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail("TrainConfig", name, getattr(self, name), "a number in [0, 1)")
        if self.loss_chunk is not None and not (isinstance(self.loss_chunk, int) and not
                                                 isinstance(self.loss_chunk, bool) and self.loss_chunk > 0):
            _fail("TrainConfig", "loss_chunk", self.loss_chunk, "a positive number of positions, or None (off)")
        for name in ("weight_decay", "grad_clip", "z_loss", "peak_tflops"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                _fail("TrainConfig", name, v, "a positive number, or None (off)")
        if not self.eps > 0:
            _fail("TrainConfig", "eps", self.eps, "a positive number")
        try:
            terms = parse_terms(self.loss)  # the spec is checked here, before any compute
        except LossSpecError as e:
            raise LossSpecError(f"TrainConfig.loss={self.loss!r} is invalid: {e}") from None
        if self.z_loss is not None and "z_loss" in terms:
            _fail("TrainConfig", "z_loss", self.z_loss, "None when the loss spec already has a z_loss term "
                  f"({self.loss!r}); give its weight once")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 takes the devices left over (at most one axis may be -1)."""

    data: int = impl(-1, "data-parallel axis size")
    fsdp: int = impl(1, "parameters and optimiser state sharded over this axis (ZeRO-3 style)")
    tensor: int = impl(1, "heads, MLP hidden and vocabulary split over this axis (Megatron style)")

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, v in sizes.items():
            if not (isinstance(v, int) and (v == -1 or v > 0)):
                _fail("MeshConfig", name, v, "a positive integer or -1 (the rest of the devices)")
        if list(sizes.values()).count(-1) > 1:
            _fail("MeshConfig", "data", sizes, "at most one axis set to -1")


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """Multi-host set-up for `jax.distributed.initialize`; all None = single process, or auto on TPU/SLURM."""

    coordinator_address: str | None = impl(None, "host:port of process 0")
    num_processes: int | None = impl(None, "number of processes (hosts)")
    process_id: int | None = impl(None, "this process's index in [0, num_processes)")

    def __post_init__(self):
        given = [v is not None for v in (self.coordinator_address, self.num_processes, self.process_id)]
        if any(given) and not all(given):
            _fail("DistConfig", "coordinator_address", self.coordinator_address,
                  "coordinator_address, num_processes and process_id all set together (or none)")
        if self.num_processes is not None and (self.num_processes < 1 or not
                                                0 <= self.process_id < self.num_processes):
            _fail("DistConfig", "process_id", self.process_id, f"an integer in [0, {self.num_processes})")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: model, data, training, mesh and multi-host settings."""

    # the default run: a small modern model (pre-RMSNorm, SwiGLU, RoPE) that trains in minutes on a CPU
    model: ModelConfig = dataclasses.field(
        default_factory=lambda: ModelConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=512))
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(seq_len=128))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    dist: DistConfig = dataclasses.field(default_factory=DistConfig)

    def __post_init__(self):
        m, d = self.model, self.data
        if m.position in ("learned", "sinusoidal") and d.seq_len > m.max_seq_len:
            raise ValueError(f"DataConfig.seq_len={d.seq_len} is invalid: expected at most "
                             f"model.max_seq_len={m.max_seq_len} with position={m.position!r}")
        if m.param_dtype != "float32":  # ModelConfig alone may hold half-precision params for inference
            raise ValueError(f"ModelConfig.param_dtype={m.param_dtype!r} is invalid for training: expected "
                             "'float32' (AdamW would keep half-precision moments with no float32 master copy "
                             "or loss scaling); use model.dtype='bfloat16' for half-precision compute")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Config:
        """A copy with dotted fields changed, validated: `cfg.replace(**{"model.norm_position": "post",
        "train.lr": 3e-3})`. A whole section may be given too (`model=ModelConfig(...)`). An unknown key
        raises `ConfigError` naming the close matches; a bad value raises the section's own error."""
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        per_section: dict[str, dict] = {}
        for key, value in changes.items():
            section, _, name = key.partition(".")
            if section not in sections or (name and name not in _field_names(type(sections[section]))):
                raise ConfigError(_unknown_key_message(key, dotted_keys(self)))
            if name:
                per_section.setdefault(section, {})[name] = value
            else:
                sections[section] = value
        for section, fields in per_section.items():
            sections[section] = dataclasses.replace(sections[section], **fields)
        return Config(**sections)


def config_sections() -> dict[str, type]:
    """Each section of a run config and its dataclass: {"model": ModelConfig, "data": DataConfig, ...}."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def dotted_keys(cfg: Config) -> list[str]:
    """Every `section.field` key of a run config, in declaration order."""
    return [f"{s.name}.{name}" for s in dataclasses.fields(cfg) for name in _field_names(type(getattr(cfg, s.name)))]


def _unknown_key_message(key: str, known: list[str]) -> str:
    import difflib

    by_field = {k.partition(".")[2]: k for k in known}
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    close += [by_field[m] for m in difflib.get_close_matches(key.rpartition(".")[2], list(by_field), n=3)
              if by_field[m] not in close]
    hint = f"did you mean {', '.join(repr(c) for c in close[:3])}?" if close else "see config.dotted_keys(Config())"
    return f"Config has no key {key!r}: {hint}"
