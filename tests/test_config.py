"""ModelConfig: valid defaults, one clear error per invalid config, round trips and derived sizes."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from lecture3.config import ConfigError, ModelConfig, RopeScaling
from lecture3.errors import Lecture3Error


def test_defaults_construct():
    cfg = ModelConfig()
    assert (cfg.norm, cfg.norm_position, cfg.activation, cfg.position) == ("rmsnorm", "pre", "swiglu", "rope")
    assert cfg.qk_norm is None and cfg.sliding_window is None and cfg.remat is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 8  # type: ignore[misc]


def err(field: str, value, allowed: str) -> str:
    """The regex of the one error line: the field, its bad value and what is allowed."""
    return re.escape(f"ModelConfig.{field}={value!r} is invalid: expected ") + ".*" + re.escape(allowed)


# (kwargs, field, bad value, a fragment of what is allowed)
BAD = [
    (dict(norm="batchnorm"), "norm", "batchnorm", "one of 'layernorm', 'rmsnorm', 'none'"),
    (dict(norm_position="middle"), "norm_position", "middle", "'pre', 'post', 'sandwich', 'post_branch'"),
    (dict(activation="tanh"), "activation", "tanh", "'relu', 'gelu', 'gelu_tanh', 'silu', 'relu2'"),
    (dict(block="fused"), "block", "fused", "one of 'serial', 'parallel'"),
    (dict(block="parallel", parallel_norm="both"), "parallel_norm", "both", "one of 'shared', 'separate'"),
    (dict(position="xpos"), "position", "xpos", "'sinusoidal', 'learned', 'rope', 'alibi', 'relative', 'none'"),
    (dict(qk_norm="half"), "qk_norm", "half", "one of 'per_head', 'full' or None"),
    (dict(dtype="float64"), "dtype", "float64", "one of 'float32', 'bfloat16', 'float16'"),
    (dict(param_dtype="int8"), "param_dtype", "int8", "one of 'float32', 'bfloat16', 'float16'"),
    (dict(remat="everything"), "remat", "everything", "one of 'full', 'dots', 'dots_no_batch' or None"),
    (dict(d_model=0), "d_model", 0, "a positive integer"),
    (dict(n_layers=2.0), "n_layers", 2.0, "a positive integer"),
    (dict(vocab_size=True), "vocab_size", True, "a positive integer"),
    (dict(d_ff=-4), "d_ff", -4, "a positive integer or None"),
    (dict(head_dim=0), "head_dim", 0, "a positive integer or None"),
    (dict(n_heads=8, n_kv_heads=3), "n_kv_heads", 3, "a divisor of n_heads=8"),
    (dict(d_model=100, n_heads=8), "n_heads", 8, "a divisor of d_model=100, or set head_dim explicitly"),
    (dict(norm_eps=0.0), "norm_eps", 0.0, "a positive number"),
    (dict(norm="rmsnorm", norm_bias=True), "norm_bias", True, "False with norm='rmsnorm'"),
    (dict(norm="none", qk_norm="per_head"), "qk_norm", "per_head", "None when norm='none'"),
    (dict(norm="none", norm_position="post"), "norm_position", "post", "'pre' when norm='none'"),
    (dict(block="parallel", norm_position="sandwich"), "norm_position", "sandwich", "'pre' with block='parallel'"),
    (dict(parallel_norm="separate"), "parallel_norm", "separate", "'shared' with block='serial'"),
    (dict(rope_theta=-1.0), "rope_theta", -1.0, "a positive number"),
    (dict(rope_fraction=0.0), "rope_fraction", 0.0, "a number in (0, 1]"),
    (dict(rope_fraction=1.5), "rope_fraction", 1.5, "a number in (0, 1]"),
    (dict(d_model=64, n_heads=4, rope_fraction=0.1), "rope_fraction", 0.1,
     "an even number >= 2 of rotated dims of head_dim=16 (got 1)"),
    (dict(position="alibi", rope_fraction=0.5), "rope_fraction", 0.5, "1.0 with position='alibi'"),
    (dict(position="learned", rope_scaling=RopeScaling()), "rope_scaling", RopeScaling(),
     "None with position='learned'"),
    (dict(rope_scaling=8.0), "rope_scaling", 8.0, "a RopeScaling or None"),
    (dict(position="sinusoidal", d_model=27, n_heads=3), "d_model", 27, "an even number with position='sinusoidal'"),
    (dict(relative_buckets=1), "relative_buckets", 1, "at least 2"),
    (dict(relative_buckets=32, relative_max_distance=16), "relative_max_distance", 16, "more than relative_buckets"),
    (dict(init_std=0.0), "init_std", 0.0, "a positive number"),
    (dict(query_scale=0.0), "query_scale", 0.0, "a positive number or None (off)"),
    (dict(attn_logit_softcap=0.0), "attn_logit_softcap", 0.0, "a positive number or None (off)"),
    (dict(final_logit_softcap=-30.0), "final_logit_softcap", -30.0, "a positive number or None (off)"),
    (dict(embed_dropout=0.0), "embed_dropout", 0.0, "a rate in (0, 1), or None (off)"),
    (dict(resid_dropout=1.0), "resid_dropout", 1.0, "a rate in (0, 1), or None (off)"),
    (dict(attn_dropout=-0.1), "attn_dropout", -0.1, "a rate in (0, 1), or None (off)"),
    (dict(layer_pattern=()), "layer_pattern", (), "a non-empty tuple of 'global' / 'local'"),
    (dict(layer_pattern=("local", "sliding"), sliding_window=4), "layer_pattern", ("local", "sliding"),
     "a non-empty tuple of 'global' / 'local'"),
    (dict(n_layers=4, layer_pattern=("local", "local", "global"), sliding_window=4), "layer_pattern",
     ("local", "local", "global"), "a pattern whose length divides n_layers=4"),
    (dict(layer_pattern=("local", "global")), "sliding_window", None, "a window size when layer_pattern has 'local'"),
    (dict(sliding_window=4), "layer_pattern", ("global",), "a pattern with at least one 'local' layer"),
    (dict(sliding_window=0, layer_pattern=("local",)), "sliding_window", 0, "a positive integer or None"),
    (dict(position="learned", max_seq_len=1 << 21), "max_seq_len", 1 << 21, "at most 2**20 with a position table"),
    (dict(tie_embeddings=1), "tie_embeddings", 1, "True or False"),
    (dict(scan_layers="yes"), "scan_layers", "yes", "True or False"),
]


@pytest.mark.parametrize("kwargs,field,value,allowed", BAD, ids=[f"{b[1]}={b[2]!r}" for b in BAD])
def test_invalid_config_names_field_value_and_allowed(kwargs, field, value, allowed):
    """A ConfigError (lecture3's own: the CLI prints it as one line), still a ValueError for callers."""
    with pytest.raises(ConfigError, match=err(field, value, allowed)) as e:
        ModelConfig(**kwargs)
    assert isinstance(e.value, Lecture3Error) and isinstance(e.value, ValueError)


def test_the_bad_table_is_broad():
    assert len(BAD) >= 20
    assert len({b[1] for b in BAD}) >= 30  # distinct fields


@pytest.mark.parametrize("kwargs,match", [
    (dict(factor=0.5), r"rope_scaling\.factor=0\.5 .*a number >= 1"),
    (dict(low_freq_factor=4.0, high_freq_factor=1.0), r"rope_scaling\.low_freq_factor=\(4\.0, 1\.0\) .*0 < low"),
    (dict(low_freq_factor=0.0), r"rope_scaling\.low_freq_factor=\(0\.0, 4\.0\) .*0 < low_freq_factor"),
    (dict(original_max_position=0), r"rope_scaling\.original_max_position=0 .*a positive integer"),
])
def test_invalid_rope_scaling(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RopeScaling(**kwargs)


ROUND_TRIP = [
    ModelConfig(),
    ModelConfig(norm="layernorm", norm_bias=True, norm_position="post", activation="gelu", position="learned",
                qkv_bias=True, tie_embeddings=False, embed_dropout=0.1, dtype="bfloat16", remat="dots"),
    ModelConfig(n_layers=4, n_kv_heads=2, head_dim=32, rope_scaling=RopeScaling(factor=4.0), qk_norm="full",
                sliding_window=16, layer_pattern=("local", "global"), attn_logit_softcap=50.0,
                final_logit_softcap=30.0, scan_layers=True, block="parallel", parallel_norm="separate"),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP)
def test_from_dict_round_trips(cfg):
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # through JSON too: tuples come back as lists and RopeScaling as a dict
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_dict_rejects_unknown_keys():
    d = ModelConfig().to_dict() | {"n_layer": 12}
    with pytest.raises(ConfigError, match=r"no field\(s\) \['n_layer'\]"):
        ModelConfig.from_dict(d)


def test_derived_sizes():
    # plain: 4 d_model; gated: 8/3 d_model rounded up to d_ff_multiple_of; an explicit d_ff wins
    assert ModelConfig(d_model=768, n_heads=12, activation="gelu").resolved_d_ff == 3072
    assert ModelConfig(d_model=768, n_heads=12, activation="swiglu").resolved_d_ff == 2048
    assert ModelConfig(d_model=4096, n_heads=32, d_ff_multiple_of=256).resolved_d_ff == 11008  # Llama 2 7B
    assert ModelConfig(d_model=256, activation="geglu").resolved_d_ff == 704  # 682.7 -> 11 * 64
    assert ModelConfig(d_model=256, d_ff_multiple_of=1).resolved_d_ff == 683
    assert ModelConfig(d_model=256, d_ff=1000).resolved_d_ff == 1000
    assert ModelConfig(d_model=256, activation="relu2", d_ff=1000).resolved_d_ff == 1000
    for act in ("reglu", "geglu", "geglu_tanh", "swiglu"):
        assert ModelConfig(activation=act).gated
    for act in ("relu", "gelu", "gelu_tanh", "silu", "relu2"):
        assert not ModelConfig(activation=act).gated
    # heads
    assert ModelConfig(d_model=256, n_heads=4).resolved_head_dim == 64
    assert ModelConfig(d_model=256, n_heads=4, head_dim=32).resolved_head_dim == 32
    assert ModelConfig(d_model=100, n_heads=8, head_dim=16).resolved_head_dim == 16
    assert ModelConfig(n_heads=8).resolved_n_kv_heads == 8
    assert ModelConfig(n_heads=8, n_kv_heads=2).resolved_n_kv_heads == 2
    assert ModelConfig(n_heads=8, n_kv_heads=1).resolved_n_kv_heads == 1
    # layer pattern and windows
    cfg = ModelConfig(n_layers=4, sliding_window=8, layer_pattern=("local", "global"))
    assert [cfg.layer_kind(i) for i in range(4)] == ["local", "global", "local", "global"]
    assert [cfg.window(i) for i in range(4)] == [8, None, 8, None]
    assert ModelConfig(layer_pattern=["global"]).layer_pattern == ("global",)  # lists become tuples
    # the final norm is skipped only where the stream is already normalised (post) or there is no norm
    assert ModelConfig().has_final_norm and ModelConfig(norm_position="sandwich").has_final_norm
    assert not ModelConfig(norm_position="post").has_final_norm
    assert not ModelConfig(norm="none").has_final_norm


def test_replace_validates():
    with pytest.raises(ValueError, match=err("n_kv_heads", 3, "a divisor of n_heads=4")):
        ModelConfig().replace(n_kv_heads=3)
