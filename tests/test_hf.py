"""Hugging Face interchange against transformers itself (torch, CPU, float32), for all seven families.

Random HF models have norm gains of one and biases of zero; every 1-D parameter is perturbed here, so a
dropped gain, bias or Gemma's 1 + w offset fails the comparison.
"""

import json
import logging
import os
import stat
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lecture3 import ModelConfig, RopeScaling, Transformer, hf, presets  # noqa: E402
from lecture3.hf.families import canonical  # noqa: E402
from lecture3.model import unstack_layers  # noqa: E402

pytestmark = pytest.mark.slow  # round trips through transformers: the fast tier skips them

torch.set_default_dtype(torch.float32)
transformers.logging.set_verbosity_error()

ATOL = 1e-4
V, T = 97, 12
SMALL = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tokens(t: int = T) -> np.ndarray:
    return np.random.RandomState(0).randint(0, V, (2, t)).astype(np.int32)


def hf_model(config, seed: int = 0):
    """A random transformers model in eval mode, with perturbed norm gains and biases."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                torch.nn.init.normal_(p, mean=0.5, std=0.5)
    return model


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()


def our_logits(cfg: ModelConfig, params, toks: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, jnp.asarray(toks)).logits)


def layers(cfg: ModelConfig, params) -> list:
    """The per-layer params as numpy (slicing a scanned stack on the host compiles nothing)."""
    return unstack_layers(cfg, jax.tree.map(np.asarray, params))


CASES = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=16, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None),
    "gpt2-untied-relu-unscaled": lambda: transformers.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=16, n_inner=80, activation_function="relu",
        scale_attn_weights=False, tie_word_embeddings=False, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None),
    "llama-gqa-untied": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2,
                                                         tie_word_embeddings=False),
    "llama-mqa-llama3-rope-biases": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral-window": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4),
    "qwen2-mqa-mixed-windows": lambda: transformers.Qwen2Config(
        **{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=1, use_sliding_window=True, sliding_window=3,
        max_window_layers=1),
    "gemma2-window-softcaps": lambda: transformers.Gemma2Config(
        **{**SMALL, "num_hidden_layers": 4}, num_key_value_heads=2, head_dim=24, sliding_window=4,
        query_pre_attn_scalar=20, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "olmo2-gqa": lambda: transformers.Olmo2Config(**SMALL, num_key_value_heads=2),
    "gpt_neox-parallel": lambda: transformers.GPTNeoXConfig(
        **SMALL, rope_parameters=dict(rope_type="default", rope_theta=10_000.0, partial_rotary_factor=0.25)),
    "gpt_neox-serial": lambda: transformers.GPTNeoXConfig(
        **SMALL, use_parallel_residual=False, hidden_act="gelu_new",
        rope_parameters=dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=0.25)),
}


@pytest.mark.parametrize("case", CASES)
def test_load_matches_transformers(case, tmp_path):
    model = hf_model(CASES[case]())
    model.save_pretrained(tmp_path)
    toks = tokens()
    ref = hf_logits(model, toks)
    cfg, params = hf.load_pretrained(tmp_path)
    np.testing.assert_allclose(our_logits(cfg, params, toks), ref, atol=ATOL, rtol=0)
    # the same checkpoint as a scanned stack: the tree init gives, holding the same layers
    scfg, sparams = hf.load_pretrained(tmp_path, scan_layers=True)
    want = jax.eval_shape(lambda: Transformer(scfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    assert jax.tree.structure(sparams) == jax.tree.structure(nn.unbox(want["params"]))
    for a, b in zip(layers(cfg, params), layers(scfg, sparams), strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_family_features_are_exercised(tmp_path):
    """The cases above can fail: windows, softcaps, partial rotary and the llama3 scaling all matter here."""
    model = hf_model(CASES["gemma2-window-softcaps"]())
    model.save_pretrained(tmp_path / "gemma2")
    cfg, params = hf.load_pretrained(tmp_path / "gemma2")
    assert cfg.layer_pattern == ("local", "global") and cfg.sliding_window == 4 and cfg.head_dim == 24
    ref = hf_logits(model, tokens())
    for change in (dict(attn_logit_softcap=None), dict(final_logit_softcap=None),
                   dict(layer_pattern=("global",), sliding_window=None), dict(query_scale=None)):
        assert np.abs(our_logits(cfg.replace(**change), params, tokens()) - ref).max() > 100 * ATOL, change

    model = hf_model(CASES["llama-mqa-llama3-rope-biases"]())
    model.save_pretrained(tmp_path / "llama")
    cfg, params = hf.load_pretrained(tmp_path / "llama")
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64) and cfg.n_kv_heads == 1
    ref = hf_logits(model, tokens(48))
    assert np.abs(our_logits(cfg.replace(rope_scaling=None), params, tokens(48)) - ref).max() > 100 * ATOL

    model = hf_model(CASES["gpt_neox-serial"]())
    model.save_pretrained(tmp_path / "neox")
    cfg, params = hf.load_pretrained(tmp_path / "neox")
    assert (cfg.block, cfg.rope_fraction, cfg.activation) == ("serial", 0.25, "gelu_tanh")
    ref = hf_logits(model, tokens())
    assert np.abs(our_logits(cfg.replace(rope_fraction=0.5), params, tokens()) - ref).max() > 100 * ATOL


# lecture3 configs, one or more per family, for the way out: lecture3 -> save_pretrained -> transformers.
BASE = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=32)
OURS = {
    "gpt2": ModelConfig(**BASE, norm="layernorm", norm_bias=True, qkv_bias=True, attn_out_bias=True,
                        mlp_bias=True, activation="gelu_tanh", position="learned"),
    "llama": ModelConfig(**BASE, n_kv_heads=2, tie_embeddings=False, rope_theta=500_000.0,
                         rope_scaling=RopeScaling(4.0, 1.0, 4.0, 16), scan_layers=True),
    "mistral": ModelConfig(**BASE, n_kv_heads=1, layer_pattern=("local",), sliding_window=4),
    "qwen2": ModelConfig(**BASE, qkv_bias=True, layer_pattern=("global", "local"), sliding_window=3,
                         tie_embeddings=False),
    "gemma2": ModelConfig(**{**BASE, "n_layers": 4}, n_kv_heads=2, head_dim=24, norm_position="sandwich",
                          activation="geglu_tanh", scale_embeddings=True, query_scale=20 ** -0.5,
                          attn_logit_softcap=2.0, final_logit_softcap=3.0, layer_pattern=("local", "global"),
                          sliding_window=4, norm_eps=1e-6, scan_layers=True),
    "olmo2": ModelConfig(**BASE, norm_position="post_branch", qk_norm="full", tie_embeddings=False),
    "gpt_neox": ModelConfig(**BASE, norm="layernorm", norm_bias=True, qkv_bias=True, attn_out_bias=True,
                            mlp_bias=True, activation="gelu", block="parallel", parallel_norm="separate",
                            rope_fraction=0.25, tie_embeddings=False),
}


def random_params(cfg: ModelConfig, seed: int = 0):
    """Random values in the tree init gives (no compile): gains near one, everything else far from init."""
    rng = np.random.RandomState(seed)
    abstract = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))

    def leaf(path, a):
        gain = jax.tree_util.keystr(path).endswith(("'scale']", "'q_norm']", "'k_norm']"))
        return jnp.asarray((gain + 0.2 * rng.standard_normal(a.shape)).astype(np.float32))

    return jax.tree_util.tree_map_with_path(leaf, nn.unbox(abstract["params"]))


@pytest.mark.parametrize("family", OURS)
def test_round_trip_through_transformers(family, tmp_path):
    cfg = OURS[family]
    params = random_params(cfg)
    assert hf.save_pretrained(cfg, params, tmp_path) == family  # the family is inferred from the config
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert model.dtype == torch.float32
    toks = tokens()
    np.testing.assert_allclose(hf_logits(model.eval(), toks), our_logits(cfg, params, toks), atol=ATOL, rtol=0)
    # and back: the same config and the same parameters, under the config's own layer layout
    back_cfg, back = hf.load_pretrained(tmp_path, scan_layers=cfg.scan_layers)
    assert canonical(back_cfg) == canonical(cfg)
    for ours, theirs in zip(layers(cfg, params), layers(back_cfg, back), strict=True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), ours, theirs)


def test_explicit_family(tmp_path):
    """A plain Llama config is also a Mistral without window; `family=` picks it."""
    cfg = ModelConfig(**BASE)
    assert hf.save_pretrained(cfg, random_params(cfg), tmp_path, family="mistral") == "mistral"
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="BertForMaskedLM.*not supported.*LlamaForCausalLM"):
        hf.load_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        hf.load_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_pretrained(tmp_path)
    transformers.LlamaConfig(**SMALL).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize("config, field", [
    (lambda: transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                     scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (lambda: transformers.LlamaConfig(**SMALL, rope_parameters=dict(rope_type="linear", rope_theta=1e4,
                                                                    factor=2.0)), "rope_type='linear'"),
    (lambda: transformers.LlamaConfig(**SMALL, hidden_act="tanh"), "hidden_act='tanh'"),
])
def test_checkpoint_lecture3_cannot_compute(config, field, tmp_path):
    config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=field):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize("cfg, family, message", [
    (ModelConfig(**BASE, position="alibi"), None, "no supported Hugging Face family.*position='alibi'"),
    (ModelConfig(**BASE), "gpt2", "GPT-2 cannot express.*position='rope'"),
    (ModelConfig(**BASE, qkv_bias=True), "llama", "Llama cannot express.*attn_out_bias=False"),
    (ModelConfig(**BASE, mlp_bias=True), "qwen2", "Qwen2 cannot express.*mlp_bias=True"),
    (ModelConfig(**BASE, layer_pattern=("local", "global"), sliding_window=4), "mistral", "Mistral cannot"),
    (ModelConfig(**BASE, block="parallel"), "gpt_neox", "GPT-NeoX cannot express.*parallel_norm='shared'"),
    (ModelConfig(**BASE, rope_fraction=0.5), "llama", "Llama cannot express.*rope_fraction=0.5"),
    (ModelConfig(**BASE), "bert", "family='bert' is not supported"),
])
def test_config_the_family_cannot_express(cfg, family, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        hf.save_pretrained(cfg, random_params(cfg), tmp_path, family=family)
    assert not (tmp_path / "config.json").exists()


def test_params_that_do_not_match_the_config(tmp_path):
    cfg = OURS["mistral"]
    with pytest.raises(ValueError, match="do not match the config.*scan_layers=True"):
        hf.save_pretrained(cfg.replace(scan_layers=True), random_params(cfg), tmp_path)
    with pytest.raises(ValueError, match="layer_0/attn/k has shape .64, 2, 16., expected .64, 1, 16."):
        hf.save_pretrained(cfg, random_params(cfg.replace(n_kv_heads=2)), tmp_path)


def test_sharded_checkpoint_and_overrides(tmp_path):
    model = hf_model(CASES["olmo2-gqa"]())
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, params = hf.load_pretrained(tmp_path / "one")
    cfg, sharded = hf.load_pretrained(tmp_path / "sharded", param_dtype="bfloat16", remat="full")
    assert cfg.remat == "full" and sharded["embed"].dtype == jnp.bfloat16
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b, np.float32), rtol=1e-2), params, sharded)
    with pytest.raises(ValueError, match="cannot override.*n_heads"):
        hf.load_pretrained(tmp_path / "one", n_heads=2)


def test_attention_impl_is_a_runtime_choice_on_save_and_load(tmp_path):
    """How attention is computed does not change what a checkpoint computes: a chunked model saves, and a
    checkpoint loads as chunked (or cudnn) with the same logits."""
    cfg = OURS["llama"].replace(attention_impl="chunked", attention_chunk=4)
    params = random_params(cfg)
    assert hf.save_pretrained(cfg, params, tmp_path) == "llama"
    back_cfg, back = hf.load_pretrained(tmp_path, scan_layers=True, attention_impl="chunked", attention_chunk=4)
    assert (back_cfg.attention_impl, back_cfg.attention_chunk) == ("chunked", 4)
    dense_cfg, dense = hf.load_pretrained(tmp_path, scan_layers=True)
    assert dense_cfg.attention_impl == "dense"
    np.testing.assert_allclose(our_logits(back_cfg, back, tokens()), our_logits(dense_cfg, dense, tokens()),
                               atol=ATOL, rtol=0)


def test_errors_are_lecture3_errors_and_keep_their_builtin_types(tmp_path):
    """The CLI prints lecture3's own errors as one line; callers catching ValueError / OSError still can."""
    from lecture3.errors import Lecture3Error

    with pytest.raises(Lecture3Error, match="not a directory") as err:
        hf.load_pretrained(tmp_path / "nowhere")
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(hf.HFError, match="not supported"):
        hf.load_pretrained(tmp_path)
    transformers.LlamaConfig(**SMALL, hidden_act="tanh").save_pretrained(tmp_path)
    with pytest.raises(hf.HFError, match="hidden_act='tanh'"):
        hf.load_pretrained(tmp_path)


@pytest.fixture
def transformers_log():
    """The WARNING-and-above records of transformers' loggers while a test runs (this module silences
    them otherwise; transformers' root logger does not propagate, so caplog would not see them)."""
    records, logger = [], logging.getLogger("transformers")
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    transformers.logging.set_verbosity(level)


@pytest.mark.parametrize("family", presets.names())
def test_round_trip_of_every_tiny_preset_makes_transformers_say_nothing(family, tmp_path, transformers_log):
    """A warning here is a preset that transformers finds suspicious (llama3:tiny's RoPE scaling was
    `original_max_position` 8192 > its max_seq_len 256: four warnings per round trip)."""
    cfg = presets.get(family, "tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hf.save_pretrained(cfg, random_params(cfg), tmp_path)
        except hf.HFError:
            pytest.skip(f"{family} has no Hugging Face family (PaLM, the lecture's consensus)")
        back, _ = hf.load_pretrained(tmp_path)
        transformers.AutoConfig.from_pretrained(tmp_path)
    assert canonical(back) == canonical(cfg)
    assert [r.getMessage() for r in transformers_log] == [] and [str(w.message) for w in caught] == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_mode_the_umask_gives(umask, tmp_path):
    """safetensors writes through a 0o600 temporary file; the weights must be as readable as config.json."""
    cfg = ModelConfig(**BASE)
    old = os.umask(umask)
    try:
        hf.save_pretrained(cfg, random_params(cfg), tmp_path / "out")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask, name


def test_without_the_hf_extra_lecture3_imports_and_hf_says_which_extra(tmp_path):
    """A base install (no transformers, no safetensors): `import lecture3` works and does not import
    them; using lecture3.hf is one line naming `lecture3[hf]`, in Python and from the CLI."""
    script = f"""
import sys, importlib.abc

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "safetensors"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, NotInstalled())
import lecture3
from lecture3 import hf
assert "transformers" not in sys.modules and "safetensors" not in sys.modules
cfg = lecture3.presets.get("gpt2")
try:
    hf.save_pretrained(cfg, {{}}, {str(tmp_path / "out")!r})
except ModuleNotFoundError as e:
    assert isinstance(e, lecture3.hf.MissingExtraError), type(e)
    print("python:", e)
from lecture3.cli import main
sys.exit(main(["generate", "--hf", {str(tmp_path / "dir")!r}, "--tokens", "1,2"]))
"""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    want = "lecture3.hf needs transformers and safetensors"
    assert proc.stdout.startswith(f"python: {want}") and "pip install 'lecture3[hf]'" in proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and want in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
