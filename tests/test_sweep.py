"""An all-pairs sweep: every pair of values of every two architecture axes builds and runs, with finite output.

A small greedy generator builds a pairwise covering array over the axes below. Pairs the validator forbids
are listed in INVALID with the rule that forbids them; the test proves each is rejected and that every other
pair is covered by a valid config. Models are tiny (d_model 32, 2 layers, vocab 61, T 12) and run eagerly,
so each primitive compiles once for the whole sweep.
"""

from __future__ import annotations

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lecture3.config import ModelConfig, RopeScaling, choices, literal_fields
from lecture3.model import Transformer

B, T, V = 2, 12, 61
TOKENS = jax.random.randint(jax.random.key(0), (B, T), 0, V)
SEGMENTS = jnp.array([[0] * 4 + [1] * 8, [0] * 9 + [1] * 3])
SIZES = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)


# tiny models compile far more than they compute: see conftest.little_xla_optimisation
pytestmark = pytest.mark.usefixtures("little_xla_optimisation")

# axis -> values; the first value is the default (or "off"). A value is a dict of ModelConfig fields.
AXES: dict[str, list[dict]] = {
    "norm": [dict(norm=v) for v in ("rmsnorm", "layernorm", "none")],
    "norm_position": [dict(norm_position=v) for v in ("pre", "post", "sandwich", "post_branch")],
    "norm_scale": [dict(norm_scale=True), dict(norm_scale=False)],
    "norm_bias": [dict(norm_bias=False), dict(norm_bias=True)],
    "qkv_bias": [dict(qkv_bias=False), dict(qkv_bias=True)],
    "attn_out_bias": [dict(attn_out_bias=False), dict(attn_out_bias=True)],
    "mlp_bias": [dict(mlp_bias=False), dict(mlp_bias=True)],
    "activation": [dict(activation=v) for v in ("swiglu", "relu", "gelu", "gelu_tanh", "silu", "relu2", "reglu",
                                                 "geglu", "geglu_tanh")],
    "block": [dict(block="serial"), dict(block="parallel")],
    "parallel_norm": [dict(parallel_norm="shared"), dict(parallel_norm="separate")],
    "position": [dict(position=v) for v in ("rope", "sinusoidal", "learned", "alibi", "relative", "none")],
    "rope_fraction": [dict(rope_fraction=1.0), dict(rope_fraction=0.5)],
    "rope_scaling": [dict(rope_scaling=None), dict(rope_scaling=RopeScaling(factor=4.0, original_max_position=8))],
    "rope_layout": [dict(rope_layout="half"), dict(rope_layout="interleaved")],
    "n_kv_heads": [dict(n_kv_heads=None), dict(n_kv_heads=2), dict(n_kv_heads=1)],  # MHA, GQA, MQA
    "head_dim": [dict(head_dim=None), dict(head_dim=16)],
    "qk_norm": [dict(qk_norm=None), dict(qk_norm="per_head"), dict(qk_norm="full")],
    "attn_logit_softcap": [dict(attn_logit_softcap=None), dict(attn_logit_softcap=5.0)],
    "final_logit_softcap": [dict(final_logit_softcap=None), dict(final_logit_softcap=3.0)],
    "window": [dict(sliding_window=None, layer_pattern=("global",)),
               dict(sliding_window=5, layer_pattern=("local",)),
               dict(sliding_window=5, layer_pattern=("local", "global"))],
    "tie_embeddings": [dict(tie_embeddings=True), dict(tie_embeddings=False)],
    "scale_embeddings": [dict(scale_embeddings=False), dict(scale_embeddings=True)],
    "dropout": [dict(embed_dropout=None, resid_dropout=None, attn_dropout=None),
                dict(embed_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1)],
    "dtype": [dict(dtype="float32"), dict(dtype="bfloat16")],
    "scan_layers": [dict(scan_layers=False), dict(scan_layers=True)],
    "remat": [dict(remat=v) for v in (None, "full", "dots", "dots_no_batch")],
    "document_mask": [dict(document_mask=False), dict(document_mask=True)],
    "d_ff": [dict(d_ff=None), dict(d_ff=48)],
    "d_ff_multiple_of": [dict(d_ff_multiple_of=64), dict(d_ff_multiple_of=8)],
    "norm_eps": [dict(norm_eps=1e-5), dict(norm_eps=1e-3)],
    "rope_theta": [dict(rope_theta=10_000.0), dict(rope_theta=500.0)],
    "relative": [dict(relative_buckets=32, relative_max_distance=128),
                 dict(relative_buckets=8, relative_max_distance=9)],
    "query_scale": [dict(query_scale=None), dict(query_scale=0.3)],
    "attention_impl": [dict(attention_impl=v) for v in ("dense", "chunked", "cudnn")],
    "attention_chunk": [dict(attention_chunk=512), dict(attention_chunk=5)],
    "init_std": [dict(init_std=0.02), dict(init_std=0.05)],
    "param_dtype": [dict(param_dtype=v) for v in ("float32", "bfloat16", "float16")],
}


def derived_axes() -> dict[str, list[dict]]:
    """A boolean or Literal field that no axis above sets sweeps all its values, its default first: a new
    option of that kind is in the sweep without an edit here (its forbidden pairs still go in INVALID)."""
    listed = set(SIZES) | {name for values in AXES.values() for v in values for name in v}
    axes = {}
    for f in dataclasses.fields(ModelConfig):
        values = (False, True) if f.type in ("bool", bool) else choices(ModelConfig, f.name)
        if f.name not in listed and values:
            axes[f.name] = [{f.name: v} for v in sorted(values, key=lambda v: v != f.default)]
    return axes


AXES.update(derived_axes())

# Choices of a Literal field that no axis holds, each with why: the coverage test below requires one or the other.
NOT_SWEPT = {("dtype", "float16"): "with attention_impl='cudnn' and remat, XLA:CPU has no F16 x F16 -> F32 dot "
                                    "(fails inside jit): a defect of the cudnn path, not of the sweep"}
NAMES = list(AXES)
EXPENSIVE = {("scan_layers", 1)}  # compiles a scan per config: used only where a pair needs it
# half-precision params are for inference (Config refuses them for training; float16 gradients overflow)
FORWARD_ONLY = {("param_dtype", 1), ("param_dtype", 2)}

Pair = tuple[tuple[str, int], tuple[str, int]]


def pair(a: str, i: int, b: str, j: int) -> Pair:
    return ((a, i), (b, j)) if NAMES.index(a) < NAMES.index(b) else ((b, j), (a, i))


def value_index(axis: str, **fields) -> int:
    return AXES[axis].index(next(v for v in AXES[axis] if all(v.get(k) == x for k, x in fields.items())))


# The pairs the validator forbids, each with its rule. They are asserted invalid below, never silently skipped.
INVALID: dict[Pair, str] = {}
for _pos in ("post", "sandwich", "post_branch"):
    INVALID[pair("norm", 2, "norm_position", value_index("norm_position", norm_position=_pos))] = "no norm to place"
    INVALID[pair("block", 1, "norm_position", value_index("norm_position", norm_position=_pos))] = "parallel is pre"
    INVALID[pair("parallel_norm", 1, "norm_position", value_index("norm_position", norm_position=_pos))] = (
        "separate norms need block='parallel', which needs 'pre'")
for _norm in (0, 2):
    INVALID[pair("norm", _norm, "norm_bias", 1)] = "only LayerNorm has a bias"
for _qk in (1, 2):
    INVALID[pair("norm", 2, "qk_norm", _qk)] = "qk_norm uses the model's norm"
INVALID[pair("block", 0, "parallel_norm", 1)] = "a serial block has one norm per branch"
for _p in range(1, len(AXES["position"])):
    INVALID[pair("position", _p, "rope_fraction", 1)] = "rope_fraction is RoPE's"
    INVALID[pair("position", _p, "rope_scaling", 1)] = "rope_scaling is RoPE's"
    INVALID[pair("position", _p, "rope_layout", 1)] = "rope_layout is RoPE's"
INVALID[pair("attention_impl", 2, "attn_logit_softcap", 1)] = "jax.nn.dot_product_attention has no soft-cap"
INVALID[pair("attention_impl", 2, "dropout", 1)] = "jax.nn.dot_product_attention has no attention dropout"
INVALID[pair("attention_impl", 2, "position", value_index("position", position="relative"))] = (
    "jax.nn.dot_product_attention has no T5 bias gradient")
INVALID[pair("attention_impl", 1, "dropout", 1)] = "the chunked softmax never holds the probabilities"


def all_pairs() -> set[Pair]:
    return {pair(a, i, b, j) for a, b in itertools.combinations(NAMES, 2)
            for i in range(len(AXES[a])) for j in range(len(AXES[b]))}


def covering_rows() -> list[dict[str, int]]:
    """Greedy pairwise covering array (AETG-like, deterministic): seed each row with an uncovered pair, then
    give every other axis the allowed value that covers most uncovered pairs (ties: the default)."""
    uncovered = all_pairs() - set(INVALID)
    rows: list[dict[str, int]] = []

    def allowed(row: dict[str, int], axis: str, i: int) -> bool:
        return all(pair(axis, i, b, j) not in INVALID for b, j in row.items())

    while uncovered:
        seed = min(uncovered, key=lambda p: (any(v in EXPENSIVE for v in p), p))
        row = dict(seed)
        for axis in sorted(NAMES, key=lambda a: -len(AXES[a])):
            if axis in row:
                continue
            choices = [i for i in range(len(AXES[axis])) if allowed(row, axis, i)
                       and ((axis, i) not in EXPENSIVE or any(v in EXPENSIVE for v in seed))]
            assert choices, (axis, row)
            row[axis] = max(choices, key=lambda i: (sum(pair(axis, i, b, j) in uncovered for b, j in row.items()), -i))
        rows.append(row)
        uncovered -= {pair(a, row[a], b, row[b]) for a, b in itertools.combinations(NAMES, 2)}
    return rows


def config(row: dict[str, int]) -> ModelConfig:
    fields = dict(SIZES)
    for axis, i in row.items():
        fields.update(AXES[axis][i])
    return ModelConfig(**fields)


ROWS = covering_rows()


def test_rows_are_valid_and_cover_every_pair():
    covered = set()
    for row in ROWS:
        config(row)  # raises if the validator rejects it
        covered |= {pair(a, row[a], b, row[b]) for a, b in itertools.combinations(NAMES, 2)}
    assert set(INVALID) <= all_pairs()
    assert covered == all_pairs() - set(INVALID), "a pair is neither covered nor known to be invalid"
    assert len(ROWS) <= 80, len(ROWS)  # the greedy array stays near the 9 x 6 = 54 lower bound
    assert sum(row["scan_layers"] for row in ROWS) <= 12


def test_every_field_has_a_sweep_case_and_every_choice_is_swept():
    """A new ModelConfig field fails here until AXES (or SIZES) gives it a value; a new choice of a Literal
    field (config.choices) fails until its axis has it."""
    swept: dict[str, set] = {name: {value} for name, value in SIZES.items()}
    for values in AXES.values():
        for v in values:
            for name, value in v.items():
                swept.setdefault(name, set()).add(value)
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    assert [f for f in fields if f not in swept] == [], "add a sweep case to AXES for these fields"
    for name in literal_fields(ModelConfig):
        skipped = {value for field, value in NOT_SWEPT if field == name}
        assert swept[name] | skipped == set(choices(ModelConfig, name)) and not swept[name] & skipped, name


@pytest.mark.parametrize("bad", list(INVALID), ids=lambda p: f"{p[0][0]}={p[0][1]}-{p[1][0]}={p[1][1]}")
def test_uncovered_pairs_are_rejected_by_the_validator(bad):
    """The pair fails whatever the other axes: with the defaults and inside several covering rows."""
    for base in [{}] + ROWS[:: len(ROWS) // 4]:
        row = dict(base) | dict(bad)
        with pytest.raises(ValueError, match=r"ModelConfig\.\w+=.* is invalid: expected"):
            config(row)


def backward_rows() -> list[int]:
    """A few rows that together hold every value of every axis (greedy set cover). Not the scan rows (the
    gradients through a compiled scan are compared with the unscanned ones in test_model), nor FORWARD_ONLY's."""
    need = {(a, i) for a in NAMES for i in range(len(AXES[a]))} - EXPENSIVE - FORWARD_ONLY
    chosen = []
    while need:
        best = max((r for r in range(len(ROWS)) if not set(ROWS[r].items()) & (EXPENSIVE | FORWARD_ONLY)),
                   key=lambda r: len(need & set(ROWS[r].items())))
        chosen.append(best)
        need -= set(ROWS[best].items())
    return chosen


def run(cfg: ModelConfig, backward: bool):
    """Init and forward (and backward): eagerly, so primitives compiled for earlier rows are reused; a scan
    compiles anew on every call either way, so scanned rows jit init and forward into one compilation."""
    model = Transformer(cfg)
    rngs = {"dropout": jax.random.key(1)}
    training = cfg.embed_dropout is not None

    def loss(p):
        logits = model.apply({"params": p}, TOKENS, segment_ids=SEGMENTS, deterministic=not training,
                             rngs=rngs).logits
        target = jnp.take_along_axis(logits, TOKENS[..., None], -1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - target), logits

    def init():
        return nn.unbox(model.init(jax.random.key(0), TOKENS)["params"])

    if backward:
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(init())
        return logits, grads
    if cfg.scan_layers:
        return jax.jit(lambda: loss(init())[1])(), None
    return loss(init())[1], None


BACKWARD = set(backward_rows())


def row_id(r: int) -> str:
    """A readable test id: the row number and its headline choices, e.g. "row07-layernorm-post-serial-gelu-alibi"."""
    row = ROWS[r]
    names = [AXES[a][row[a]][a] for a in ("norm", "norm_position", "block", "activation", "position")]
    return "-".join([f"row{r:02d}", *names] + ["scan"] * row["scan_layers"] + ["backward"] * (r in BACKWARD))


def test_backward_rows_are_few():
    assert len(BACKWARD) <= 14  # 37 axes; half-precision params forward only


@pytest.mark.parametrize("r", range(len(ROWS)), ids=row_id)
@pytest.mark.slow
def test_sweep_row_runs_with_finite_outputs(r):
    """One covering row per test: xdist spreads them, and one bad row does not hide the others."""
    row = ROWS[r]
    cfg = config(row)
    logits, grads = run(cfg, r in BACKWARD)
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32, row
    assert bool(jnp.all(jnp.isfinite(logits))), f"non-finite logits: {cfg}"
    if grads is not None:
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            assert bool(jnp.all(jnp.isfinite(g))), f"non-finite gradient {jax.tree_util.keystr(path)}: {cfg}"
