"""KV-cache decoding: cached greedy == recomputing the full forward pass, cache sizes, sampling, stop tokens,
log-probabilities, errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import accounting, decoding
from lecture3.config import ModelConfig
from lecture3.decoding import TRACES, GenerationError, decode, decode_steps, generate, prefill, sample_logits
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
    return Transformer(cfg).apply({"params": params}, tokens).logits


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
    result = generate(cfg, params, PROMPTS, NEW, return_logits=True, return_logprobs=True)
    COMPILED_STEPS[name] = TRACES["decode_step"] - before
    return result.tokens, result.logits, result.logprobs


@pytest.mark.parametrize("name", CASES)
def test_cached_greedy_equals_full_forward(name):
    cfg, params = model(name)
    out, logits, _ = cached(name)
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
    before, size = TRACES["decode_step"], decode_steps._cache_size()
    generate(cfg, params, [[2, 4, 6, 8, 10, 12, 14], [5], [1, 1]], NEW, return_logits=True, return_logprobs=True)
    assert TRACES["decode_step"] == before and decode_steps._cache_size() == size


def test_rows_are_independent_of_the_batch_and_array_prompts_match_lists():
    cfg, params = model(ALIBI)
    batched = np.asarray(cached(ALIBI)[0])
    padded = np.full((3, 10), 60, np.int32)  # junk past each length is ignored
    for row, p in enumerate(PROMPTS[::-1]):
        padded[row, : len(p)] = p
    reversed_rows = generate(cfg, params, padded, NEW, lengths=[1, 3, 7])
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
    (dict(stop_tokens=61), r"stop token 61 is outside the vocabulary \[0, 61\)"),
    (dict(stop_tokens=(3, -1)), r"stop token -1 is outside the vocabulary"),
    (dict(stop_tokens=(3, 2.0)), "holds 2.0: expected integer token ids"),
    (dict(stop_tokens=(True,)), "holds True"),
    (dict(stop_tokens=None), "stop_tokens=None is invalid"),
    (dict(stop_tokens="2"), "stop_tokens='2' is invalid"),
    (dict(pad_id=0.5), "pad_id=0.5 is invalid"),
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
    greedy = np.asarray(cached(ALIBI)[0])
    late = int(greedy[0, 7 + 5])  # row 0's sixth new token: it stops in the second chunk
    first = tuple(int(greedy[row, len(p)]) for row, p in enumerate(PROMPTS))  # all stop in the first chunk
    for kwargs in (dict(), dict(temperature=0.9, top_k=20, rng=key), dict(stop_tokens=late),
                   dict(stop_tokens=first, pad_id=-1)):
        plain = generate(cfg, params, PROMPTS, NEW, return_logits=True, return_logprobs=True, **kwargs)
        chunked = generate(cfg, params, PROMPTS, NEW, return_logits=True, return_logprobs=True, progress=True,
                           **kwargs)
        chex.assert_trees_all_equal((chunked.tokens, chunked.generated), (plain.tokens, plain.generated))
        chex.assert_trees_all_close((chunked.logits, chunked.logprobs), (plain.logits, plain.logprobs), atol=1e-5)
        chex.assert_shape(chunked.tokens, (len(PROMPTS), max(map(len, PROMPTS)) + NEW))
        chex.assert_type(chunked.tokens, jnp.int32)
        assert "generate: 100%" in capsys.readouterr().err
    assert plain.generated.tolist() == [1, 1, 1] and (np.asarray(plain.tokens)[0, 8:] == -1).all()
    generate(cfg, params, PROMPTS, 3, progress=True)  # a short one: no bar
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", [ROPE, ALIBI])
def test_prefill_computes_the_last_position_logits_only(name):
    cfg, params = model(name)
    tokens = np.zeros((3, 7), np.int32)
    for row, p in enumerate(PROMPTS):
        tokens[row, : len(p)] = p
    lens = jnp.asarray([7, 3, 1])
    _, last = prefill(cfg, params, jnp.asarray(tokens), lens, 7 + NEW)
    full = np.asarray(full_forward(cfg, params, jnp.asarray(tokens)))  # [B, T, V]
    np.testing.assert_allclose(np.asarray(last), full[np.arange(3), np.asarray(lens) - 1], atol=1e-4, rtol=0)
    # No [B, T, V] array anywhere in the compiled prefill (the full forward pass, the control, has one).
    full_shape = f"f32[3,7,{cfg.vocab_size}]"
    assert full_shape in full_forward.lower(cfg, params, jnp.asarray(tokens)).compile().as_text()
    assert full_shape not in prefill.lower(cfg, params, jnp.asarray(tokens), lens, 7 + NEW).compile().as_text()


def _first(row: np.ndarray, ids) -> int:
    """Index of the first of `ids` in a row of new tokens (len(row) when none occurs)."""
    hits = np.flatnonzero(np.isin(row, list(ids)))
    return int(hits[0]) if hits.size else len(row)


@pytest.mark.parametrize("name", [ROPE, ALIBI])
def test_stop_tokens_end_rows_early_pad_after_and_equal_the_unstopped_output_until_then(name):
    cfg, params = model(name)
    tokens, _, logprobs = (np.asarray(a) for a in cached(name))
    new = [tokens[row, len(p) : len(p) + NEW] for row, p in enumerate(PROMPTS)]
    stop = (int(new[0][3]), int(new[1][0]))  # row 0 stops by its 4th new token, row 1 at its first
    res = generate(cfg, params, PROMPTS, NEW, stop_tokens=stop, pad_id=-1, return_logprobs=True)
    out, lp = np.asarray(res.tokens), np.asarray(res.logprobs)
    ends = [_first(n, stop) + 1 for n in new]  # tokens each row keeps, its stop included
    assert ends[0] <= 4 and ends[1] == 1, "degenerate test: the stops should come early"
    assert res.generated.tolist() == [min(e, NEW) for e in ends]
    for row, p in enumerate(PROMPTS):
        n, end = len(p), min(ends[row], NEW)
        np.testing.assert_array_equal(out[row, : n + end], tokens[row, : n + end])  # the same until the stop
        assert (out[row, n + end :] == -1).all()  # pad_id after it (and after each row's generation)
        np.testing.assert_allclose(lp[row, :end], logprobs[row, :end], atol=1e-5)
        assert (lp[row, end:] == 0).all()
    # A row that never meets a stop is untouched: no stop tokens at all is the plain output.
    np.testing.assert_array_equal(np.asarray(generate(cfg, params, PROMPTS, NEW, stop_tokens=())), tokens)


def test_decoding_ends_once_every_row_has_stopped():
    cfg, params = model(ROPE)
    tokens = np.asarray(cached(ROPE)[0])
    lens = [len(p) for p in PROMPTS]
    stop = jnp.asarray(sorted({int(tokens[row, n + 1]) for row, n in enumerate(lens)}), jnp.int32)
    padded = np.zeros((3, 7), np.int32)
    for row, p in enumerate(PROMPTS):
        padded[row, : len(p)] = p

    def fed(stop):  # the newest stream index in each row's cache of a global layer after decoding
        cache, last = prefill(cfg, params, jnp.asarray(padded), jnp.asarray(lens), 7 + NEW)
        out = decode_steps(cfg, params, cache, last, jnp.asarray(lens), jax.random.key(0), jnp.float32(1),
                           jnp.int32(61), jnp.float32(1), 0, None, stop, 0, steps=NEW, greedy=True)
        return np.asarray(out.cache[1]["idx"]).max(axis=-1), out  # layer 1 is global

    newest, out = fed(None)
    np.testing.assert_array_equal(newest, np.asarray(lens) + NEW - 2)  # all but the last token fed back
    newest, out = fed(stop)  # every row stops by its second new token: two steps, not NEW - 1
    assert out.done.all() and (np.asarray(out.generated) <= 2).all()
    np.testing.assert_array_equal(newest, np.asarray(lens) + 1)


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=2.0, top_k=5, top_p=0.9, rng=jax.random.key(1))])
def test_logprobs_are_log_softmax_of_the_logits_at_the_chosen_tokens(kwargs):
    cfg, params = model(ROPE)
    res = generate(cfg, params, PROMPTS, NEW, return_logits=True, return_logprobs=True, **kwargs)
    out, logits, lp = np.asarray(res.tokens), np.asarray(res.logits), np.asarray(res.logprobs)
    chex.assert_shape(lp, (3, NEW))
    assert lp.dtype == np.float32
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))  # [B, NEW, V], no temperature
    for row, p in enumerate(PROMPTS):
        chosen = out[row, len(p) : len(p) + NEW]
        np.testing.assert_allclose(lp[row], log_probs[row, np.arange(NEW), chosen], atol=1e-5, rtol=0)
    assert (lp < 0).all() and not np.allclose(lp, lp.max())
    if not kwargs:  # greedy: the most likely token each time
        np.testing.assert_allclose(lp, log_probs.max(axis=-1), atol=1e-5)
    logprobs_only = generate(cfg, params, PROMPTS, NEW, return_logprobs=True, **kwargs)
    assert logprobs_only.logits is None
    np.testing.assert_allclose(np.asarray(logprobs_only.logprobs), lp, atol=1e-6)


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
    eos = int(ours[0, len(HF_PROMPTS[0]) + 3])  # row 0 stops by its fourth new token
    stopped = np.asarray(generate(cfg, params, HF_PROMPTS, HF_NEW, stop_tokens=(eos,), pad_id=0))
    for row, p in enumerate(HF_PROMPTS):
        with torch.no_grad():
            mask = torch.ones(1, len(p), dtype=torch.long)
            theirs = reference.generate(torch.tensor([p]), attention_mask=mask, do_sample=False,
                                        max_new_tokens=HF_NEW, min_new_tokens=HF_NEW, pad_token_id=0)
            theirs_eos = reference.generate(torch.tensor([p]), attention_mask=mask, do_sample=False,
                                            max_new_tokens=HF_NEW, eos_token_id=eos, pad_token_id=0)[0].numpy()
        np.testing.assert_array_equal(ours[row, : len(p) + HF_NEW], theirs[0].numpy())
        np.testing.assert_array_equal(stopped[row, : len(theirs_eos)], theirs_eos)  # transformers stops there too
        assert (stopped[row, len(theirs_eos) :] == 0).all()
    assert len(stopped[0]) - (stopped[0] == 0).sum() <= len(HF_PROMPTS[0]) + 4


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

    n = len(HF_PROMPTS[0])
    stop = int(expected[0, n + 2])
    end = _first(expected[0, n : n + HF_NEW], [stop]) + 1  # tokens row 0 keeps, its stop included
    code, lines, _ = run("--tokens", ",".join(map(str, HF_PROMPTS[0])), "--max-new-tokens", str(HF_NEW),
                         "--stop-token", str(stop), "--logprobs")
    res = generate(*hf.load_pretrained(tmp_path), HF_PROMPTS[:1], HF_NEW, stop_tokens=stop, return_logprobs=True)
    assert code == 0 and len(lines) == 2 and end <= 3
    assert lines[0].split() == [f"w{i}" for i in expected[0, : n + end]]  # printed up to its stop token
    head, values = lines[1].split(": ")
    np.testing.assert_allclose([float(x) for x in values.split()], np.asarray(res.logprobs[0, :end]), atol=1e-4)
    assert head == f"logprobs (sum {float(np.asarray(res.logprobs[0, :end]).sum()):.4f})"
    code, _, err = run("--tokens", "1,2", "--stop-token", "61", "--max-new-tokens", "8")
    assert code == 2 and "stop token 61 is outside the vocabulary [0, 61)" in err and len(err.splitlines()) == 1
