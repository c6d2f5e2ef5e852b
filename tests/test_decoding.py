"""KV-cache decoding: cached greedy == recomputing the full forward pass, cache sizes, sampling, errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import accounting, decoding
from lecture3.config import ModelConfig
from lecture3.decoding import TRACES, GenerationError, decode, generate, prefill, sample_logits
from lecture3.layers.kv_cache import cache_bytes, init_cache
from lecture3.model import Transformer

pytestmark = pytest.mark.slow  # compiles models or runs the trainer: the fast tier skips it

BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, init_std=0.2, max_seq_len=64)
LOCAL = dict(sliding_window=4)  # shorter than every generated sequence (prompt 7 + 9 new)
SCAN = dict(scan_layers=True, n_layers=4)
# Every position scheme, head layout (MHA, GQA, MQA), window pattern, norm position, soft-cap and block
# layout at least once (combined, to keep compiles few); each case mixes prompt lengths 7, 3, 1 in a batch.
CASES = {
    "rope-mha-local_global-partial-qknorm-attn_softcap": dict(
        position="rope", rope_fraction=0.5, qk_norm="per_head", attn_logit_softcap=2.0, **LOCAL,
        layer_pattern=("local", "global")),
    "learned-gqa-global_local-post-layernorm-biases": dict(  # fills max_seq_len exactly
        position="learned", max_seq_len=16, n_kv_heads=2, norm="layernorm", norm_bias=True,
        norm_position="post", qkv_bias=True, attn_out_bias=True, mlp_bias=True, activation="gelu", **LOCAL,
        layer_pattern=("global", "local")),
    "sinusoidal-mqa-local-sandwich-softcaps": dict(
        position="sinusoidal", n_kv_heads=1, norm_position="sandwich", attn_logit_softcap=5.0,
        final_logit_softcap=3.0, **LOCAL, layer_pattern=("local",)),
    "alibi-gqa-local_global-post_branch-scan": dict(
        position="alibi", n_kv_heads=2, norm_position="post_branch", **LOCAL,
        layer_pattern=("local", "global"), **SCAN),
    "relative-mqa-local-parallel-scan": dict(
        position="relative", n_kv_heads=1, block="parallel", parallel_norm="separate", relative_buckets=8,
        relative_max_distance=16, **LOCAL, layer_pattern=("local",), **SCAN),
    "none-mha-global-qknorm_full-untied-scan": dict(
        position="none", qk_norm="full", tie_embeddings=False, scale_embeddings=True, **SCAN),
}
ROPE, LEARNED, _, ALIBI, *_ = CASES
PROMPTS = [[3, 14, 15, 9, 26, 53, 5], [8, 9, 7], [42]]
NEW = 9


@functools.cache
def model(name: str) -> tuple[ModelConfig, dict]:
    """A tiny model with random parameters (numpy: no init to compile; norm gains random too)."""
    cfg = ModelConfig(**{**BASE, **CASES[name]})
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens))
    rng = np.random.default_rng(len(name))

    def draw(path, s):  # norm gains around 1, the rest around 0; larger than init_std: sharper
        name = jax.tree_util.keystr(path)
        gain = s.ndim == 1 and "bias" not in name
        std = 0.3 if "embed" in name else 0.4
        return jnp.asarray(rng.normal(1.0 if gain else 0.0, std, s.shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    return cfg, params


@functools.partial(jax.jit, static_argnums=0)
def full_forward(cfg, params, tokens):
    return Transformer(cfg).apply({"params": params}, tokens)


def uncached_greedy(cfg, params, prompts, new):
    """The reference: recompute the whole forward pass for every new token (one fixed-size buffer)."""
    lens = [len(p) for p in prompts]
    buf = np.zeros((len(prompts), max(lens) + new), np.int32)
    for row, p in enumerate(prompts):
        buf[row, : len(p)] = p
    for i in range(new):
        logits = np.asarray(full_forward(cfg, params, jnp.asarray(buf)))
        for row, n in enumerate(lens):
            buf[row, n + i] = np.argmax(logits[row, n - 1 + i])
    return buf, logits  # the last logits cover every step: position n - 1 + i chose token i


COMPILED_STEPS = {}  # case -> times the decode step was traced while generating its 9 tokens


@functools.cache
def cached(name: str):
    cfg, params = model(name)
    before = TRACES["decode_step"]
    result = generate(cfg, params, PROMPTS, NEW, return_logits=True)
    COMPILED_STEPS[name] = TRACES["decode_step"] - before
    return result


@pytest.mark.parametrize("name", CASES)
def test_cached_greedy_equals_full_forward(name):
    cfg, params = model(name)
    out, logits = cached(name)
    ref, ref_logits = uncached_greedy(cfg, params, PROMPTS, NEW)
    np.testing.assert_array_equal(np.asarray(out), ref)
    assert out.dtype == jnp.int32 and out.shape == (3, 7 + NEW)
    for row, p in enumerate(PROMPTS):
        n = len(p)
        np.testing.assert_allclose(np.asarray(logits[row]), ref_logits[row, n - 1 : n - 1 + NEW], atol=1e-4,
                                   rtol=0)
        assert (np.asarray(out[row, n + NEW :]) == 0).all()  # right padding after each row's generation
    out_np = np.asarray(out)
    generated = {t for row, p in enumerate(PROMPTS) for t in out_np[row, len(p) : len(p) + NEW].tolist()}
    assert len(generated) >= 3, "degenerate test: too few distinct tokens"


def test_one_compiled_step_for_all_tokens():
    cfg, params = model(ROPE)
    cached(ROPE)
    assert set(COMPILED_STEPS.values()) == {1}  # once per new shape, not once per token (or 0: reused)
    before, size = TRACES["decode_step"], decode._cache_size()
    generate(cfg, params, [[2, 4, 6, 8, 10, 12, 14], [5], [1, 1]], NEW, return_logits=True)
    assert TRACES["decode_step"] == before and decode._cache_size() == size


def test_rows_are_independent_of_the_batch_and_array_prompts_match_lists():
    cfg, params = model(ALIBI)
    batched = np.asarray(cached(ALIBI)[0])
    padded = np.full((3, 10), 60, np.int32)  # junk past each length is ignored
    for row, p in enumerate(PROMPTS[::-1]):
        padded[row, : len(p)] = p
    reversed_rows, _ = generate(cfg, params, padded, NEW, lengths=[1, 3, 7], return_logits=True)
    np.testing.assert_array_equal(np.asarray(reversed_rows)[::-1], batched)


@pytest.mark.parametrize("name", [ROPE, LEARNED, ALIBI, "relative-mqa-local-parallel-scan"])
def test_cache_bytes_equal_accounting_and_local_layers_stay_in_their_window(name):
    cfg, params = model(name)
    for length in (1, 3, 4, 5, 16, 300):
        assert cache_bytes(init_cache(cfg, 3, length)) == accounting.kv_cache_bytes(cfg, 3, length)
    # The cache after a real prefill (7-token prompt > window) and 8 decode steps.
    tokens = np.zeros((3, 7), np.int32)
    for row, p in enumerate(PROMPTS):
        tokens[row, : len(p)] = p
    lens = jnp.asarray([7, 3, 1])
    cache, last = prefill(cfg, params, jnp.asarray(tokens), lens, 7 + NEW)
    cache, _, _ = decode(cfg, params, cache, last, lens, jax.random.key(0), jnp.float32(1), jnp.int32(61),
                         jnp.float32(1), steps=NEW, greedy=True, keep_logits=True)
    assert cache_bytes(cache) == accounting.kv_cache_bytes(cfg, 3, 7 + NEW)
    kv = cfg.resolved_n_kv_heads
    for slot, kind in enumerate(cfg.layer_pattern):
        period = len(cfg.layer_pattern)
        layers = [cache[slot]] if cfg.scan_layers else [cache[i] for i in range(slot, cfg.n_layers, period)]
        for layer in layers:
            s = 4 if kind == "local" else 7 + NEW
            assert layer["k"].shape[-3:] == (s, kv, cfg.resolved_head_dim) and layer["idx"].shape[-1] == s
            idx = np.asarray(layer["idx"]).reshape(-1, 3, s)
            for row, n in enumerate([7, 3, 1]):
                last_fed = n + NEW - 2  # the last generated token is never fed back
                want = range(last_fed - 3, last_fed + 1) if kind == "local" else range(last_fed + 1)
                for group in idx:
                    assert sorted(group[row][group[row] >= 0].tolist()) == list(want)


def test_mqa_and_gqa_store_less_than_mha():
    sizes = [cache_bytes(init_cache(ModelConfig(**BASE, n_kv_heads=k), 2, 32)) for k in (4, 2, 1)]
    assert sizes[0] == 2 * sizes[1] == 4 * sizes[2]


def test_sampling_is_deterministic_and_top_k_1_or_tiny_top_p_is_greedy():
    cfg, params = model(ROPE)
    greedy = np.asarray(cached(ROPE)[0])

    def sample(key=7, **kw):
        return np.asarray(generate(cfg, params, PROMPTS, NEW, rng=jax.random.key(key), temperature=2.0, **kw))

    a = sample()
    np.testing.assert_array_equal(a, sample())
    assert not np.array_equal(a, sample(key=8))
    assert not np.array_equal(a, greedy)
    np.testing.assert_array_equal(sample(top_k=1), greedy)
    np.testing.assert_array_equal(sample(top_p=1e-6), greedy)
    np.testing.assert_array_equal(sample(key=3, top_k=2, top_p=1e-6), greedy)


def test_sample_logits_respects_top_k_top_p_and_the_distribution():
    probs = np.array([0.4, 0.3, 0.2, 0.1, 0.0], np.float32)
    logits = jnp.log(jnp.asarray(np.tile(probs + 1e-12, (4000, 1))))
    key = jax.random.key(0)
    plain = np.asarray(sample_logits(logits, key, 1.0))
    np.testing.assert_allclose(np.bincount(plain, minlength=5) / 4000, probs, atol=0.03)
    assert set(np.asarray(sample_logits(logits, key, 1.0, top_k=2)).tolist()) == {0, 1}
    assert set(np.asarray(sample_logits(logits, key, 1.0, top_p=0.5)).tolist()) == {0, 1}
    assert set(np.asarray(sample_logits(logits, key, 1.0, top_p=0.75)).tolist()) == {0, 1, 2}
    assert set(np.asarray(sample_logits(logits, key, 1.0, top_k=3, top_p=0.95)).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(np.asarray(sample_logits(logits, None, 0.0)), 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=np.zeros((2, 0), np.int32)), "prompts is empty"),
    (dict(prompts=[[1, 2, 61]]), "outside the vocabulary"),
    (dict(max_new_tokens=15), "past max_seq_len=16"),
    (dict(top_p=0.0, temperature=1.0), "top_p=0.0 is invalid"),
    (dict(top_p=1.5, temperature=1.0), "top_p=1.5 is invalid"),
    (dict(top_p=-0.1), "top_p=-0.1 is invalid"),
    (dict(top_k=0, temperature=1.0), "top_k=0 is invalid"),
    (dict(temperature=-1.0), "temperature=-1.0 is invalid"),
    (dict(temperature=1.0, rng=None), "needs rng"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1 is invalid"),
    (dict(prompts=[1, 2, 3]), "wrap a single prompt"),
])
def test_bad_input_is_a_clear_value_error(kwargs, match):
    cfg, params = model(LEARNED)
    args = dict(prompts=[[1, 2]], max_new_tokens=4, rng=jax.random.key(0)) | kwargs
    with pytest.raises(GenerationError, match=match) as err:  # a Lecture3Error: the CLI prints one line
        generate(cfg, params, args.pop("prompts"), args.pop("max_new_tokens"), **args)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", CASES)
def test_past_max_seq_len_is_an_error_before_any_compute_unless_asked_for_without_a_table(name, monkeypatch):
    cfg, params = model(name)
    new = cfg.max_seq_len - 1  # a 2-token prompt: one past

    def compiled(*args, **kwargs):
        raise AssertionError("the request reached the compiled prefill")

    monkeypatch.setattr(decoding, "prefill", compiled)
    with pytest.raises(GenerationError, match=rf"past max_seq_len={cfg.max_seq_len}: ask for at most {new - 1} "):
        generate(cfg, params, [[1, 2]], new)
    if cfg.position in decoding.TABLE_POSITIONS:  # a table has no row past max_seq_len, opt-in or not
        with pytest.raises(GenerationError, match=f"{cfg.position}-position table of this model has"):
            generate(cfg, params, [[1, 2]], new, allow_past_max_seq_len=True)
    else:
        with pytest.raises(AssertionError, match="reached the compiled prefill"):  # checks passed
            generate(cfg, params, [[1, 2]], new, allow_past_max_seq_len=True)


def test_rope_extrapolates_past_max_seq_len_on_request():
    cfg, params = model(ROPE)
    short = cfg.replace(max_seq_len=8)  # the same params: max_seq_len sizes no rope table
    out = generate(short, params, PROMPTS, NEW, allow_past_max_seq_len=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(cached(ROPE)[0]))


def test_progress_chunks_give_the_same_tokens_and_show_a_bar(monkeypatch, capsys):
    cfg, params = model(ALIBI)
    monkeypatch.setattr(decoding, "PROGRESS_CHUNK", 4)  # 9 new tokens: chunks of 4, 4, then 1
    key = jax.random.key(3)
    for kwargs in (dict(), dict(temperature=0.9, top_k=20, rng=key)):
        plain, plain_logits = generate(cfg, params, PROMPTS, NEW, return_logits=True, **kwargs)
        chunked, chunked_logits = generate(cfg, params, PROMPTS, NEW, return_logits=True, progress=True, **kwargs)
        chex.assert_trees_all_equal(chunked, plain)
        chex.assert_trees_all_close(chunked_logits, plain_logits, atol=1e-5)
        chex.assert_shape(chunked, (len(PROMPTS), max(map(len, PROMPTS)) + NEW))
        chex.assert_type(chunked, jnp.int32)
        assert "generate: 100%" in capsys.readouterr().err
    generate(cfg, params, PROMPTS, 3, progress=True)  # a short one: no bar
    assert capsys.readouterr().err == ""


HF_MODELS = {  # tiny random float32 checkpoints; the Mistral window (4) is shorter than the generation
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=4)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=32)),
}


def save_hf_model(family: str, path) -> "torch.nn.Module":  # noqa: F821
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_class, model_class, sizes = HF_MODELS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=61, initializer_range=0.2, bos_token_id=None,
                                                 eos_token_id=None, pad_token_id=None,
                                                 attn_implementation="eager", **sizes)
    reference = getattr(transformers, model_class)(config).float().eval()
    reference.save_pretrained(path)
    return reference


HF_PROMPTS, HF_NEW = [[3, 14, 15, 9, 26, 53], [8, 9]], 10


@pytest.mark.parametrize("family", HF_MODELS)
def test_greedy_generate_matches_transformers(family, tmp_path):
    import torch

    from lecture3 import hf

    reference = save_hf_model(family, tmp_path)
    cfg, params = hf.load_pretrained(tmp_path)
    ours = np.asarray(generate(cfg, params, HF_PROMPTS, HF_NEW))
    for row, p in enumerate(HF_PROMPTS):
        with torch.no_grad():
            mask = torch.ones(1, len(p), dtype=torch.long)
            theirs = reference.generate(torch.tensor([p]), attention_mask=mask, do_sample=False,
                                        max_new_tokens=HF_NEW, min_new_tokens=HF_NEW, pad_token_id=0)
        np.testing.assert_array_equal(ours[row, : len(p) + HF_NEW], theirs[0].numpy())


def test_generate_cli_from_hf_dir(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lecture3 import hf
    from lecture3.cli import main

    save_hf_model("llama-gqa", tmp_path)
    capsys.readouterr()  # transformers' own progress bar

    def run(*argv):
        code = main(["generate", "--hf", str(tmp_path), *argv])
        captured = capsys.readouterr()
        return code, captured.out.splitlines(), captured.err

    code, _, err = run("--prompt", "w8 w9")
    assert code == 2 and "no tokenizer.json" in err and "--tokens" in err and len(err.splitlines()) == 1
    code, _, err = run("--tokens", "1,2", "--temperature", "1", "--top-p", "1.5", "--max-new-tokens", "8")
    assert code == 2 and "top_p=1.5 is invalid" in err and len(err.splitlines()) == 1
    code, _, err = run("--tokens", "1,2", "--max-new-tokens", "100000")  # max_position_embeddings=64
    assert code == 2 and err.startswith("error: max_new_tokens=100000 takes a 2-token prompt to 100002 tokens, "
                                        "past max_seq_len=64: ask for at most 62 new tokens") and "--allow-long" in err

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(61)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(tmp_path / "tokenizer.json"))
    code, lines, _ = run("--tokens", ",".join(map(str, HF_PROMPTS[0])), "--prompt", "w8 w9",
                         "--max-new-tokens", str(HF_NEW))
    expected = np.asarray(generate(*hf.load_pretrained(tmp_path), HF_PROMPTS, HF_NEW))
    assert code == 0 and len(lines) == 2
    assert lines[0].split() == [f"w{i}" for i in expected[0]]
    assert lines[1].split() == [f"w{i}" for i in expected[1, : 2 + HF_NEW]]
