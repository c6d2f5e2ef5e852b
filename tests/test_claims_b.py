"""Claims 7, 8, 13, 14 and 15: each criterion judged on small synthetic records where the answer is known
(pass, fail, diverged runs, missing runs), and the parameter matching of claims 8 and 13. No training here:
the quick paths run in tests/test_experiment_runner.py."""

import dataclasses
import math

import pytest

from lecture3 import accounting
from lecture3.experiment import protocol, runner
from lecture3.experiment.spec import Results

LN_V = math.log(2048)
JITTER = (-0.004, 0.0, 0.004)  # per-seed offsets: a small SE (threshold max(2 SE, 0.01) = 0.01)


@pytest.fixture(scope="module")
def claims():
    return {n: runner.load(n) for n in ("c07", "c08", "c13", "c14", "c15")}


def train_result(loss: float, seed: int, diverged: bool = False, **extra) -> dict:
    val = loss + JITTER[seed]
    res = {"final_val_loss": None if diverged else val, "final_loss": LN_V if diverged else val,
           "diverged": diverged, "diverged_step": 17 if diverged else None, "initial_loss": LN_V,
           "train_loss_tail": None if diverged else val, "tokens": 614_400, "history": []}
    res.update(extra)
    return res


def fake(claim, train, measures=None, skip=()) -> Results:
    """Records for the claim's cpu grid: train(spec) -> (loss, diverged, extra) for training runs,
    measures[measure](spec) -> result for the others; arms in `skip` have no record."""
    specs = claim.runs("cpu")
    records = {}
    for s in specs:
        if s.tags.get("arm") in skip:
            continue
        if s.measure == "train":
            loss, diverged, extra = train(s)
            records[s.key] = {"result": train_result(loss, s.tags.get("seed", 0), diverged, **extra)}
        elif measures and s.measure in measures:
            records[s.key] = {"result": measures[s.measure](s)}
    return Results(specs, records)


def by_arm(losses: dict, diverged: dict | None = None, extra=None):
    """A train(spec) for fake(): loss per arm, (arm, seed) pairs that diverged, extra result fields."""
    diverged = diverged or {}

    def train(spec):
        arm, seed = spec.tags["arm"], spec.tags["seed"]
        return losses[arm], (arm, seed) in diverged, ({} if extra is None else extra(spec))

    return train


def passed(claim, results) -> dict:
    return {c.name: c.passed for c in claim.criteria(results)}


# ---------------------------------------------------------------- claim 7


C07_PASS = {"rope": 4.00, "sinusoidal": 4.10, "learned": 4.10, "alibi": 4.00, "relative": 4.005, "none": 4.20}


def _long(spec):
    return {"evals": {"seq_len_512": 4.3}} if spec.args.get("eval_seq_lens") else {}


def test_c07_grid(claims):
    specs = claims["c07"].runs("cpu")
    assert len(specs) == 6 * 3
    for s in specs:
        assert s.config.data.seq_len == 256 and s.config.train.batch_size * 256 == 16 * 128
        assert s.config.train.lr == 3e-3 and s.config.model.max_seq_len >= 512
        assert ("eval_seq_lens" in s.args) == (s.tags["arm"] != "learned")


def test_c07_pass(claims):
    c = claims["c07"]
    res = fake(c, by_arm(C07_PASS, extra=_long))
    assert passed(c, res) == {"(a)": True, "(b)": True}
    obs = " ".join(c.observations(res))
    assert "T = 512" in obs and "rope 4.3000" in obs and "learned 4.3" not in obs
    assert c.key_number(res).startswith("rope 4.000")


def test_c07_fail(claims):
    c = claims["c07"]
    # rope worse than alibi (a), and only equal to learned (b)
    res = fake(c, by_arm({**C07_PASS, "alibi": 3.90, "learned": 4.005}))
    assert passed(c, res) == {"(a)": False, "(b)": False}


def test_c07_diverged(claims):
    c = claims["c07"]
    # learned diverged in every seed (ln V): rope is better than it, still a pass
    res = fake(c, by_arm(C07_PASS, diverged={("learned", s) for s in protocol.SEEDS}))
    assert passed(c, res) == {"(a)": True, "(b)": True}
    # one diverged learned seed: the spread makes rope only "equal" to learned by the rule
    res = fake(c, by_arm(C07_PASS, diverged={("learned", 1)}))
    assert passed(c, res) == {"(a)": True, "(b)": False}
    # one diverged rope seed (ln V) raises rope's mean and its SE: not "worse" than any (the spread), but no
    # longer better than learned or sinusoidal
    res = fake(c, by_arm(C07_PASS, diverged={("rope", 0)}))
    assert passed(c, res) == {"(a)": True, "(b)": False}
    assert "diverged" in " ".join(c.observations(res))
    # every rope seed diverged: worse than all
    res = fake(c, by_arm(C07_PASS, diverged={("rope", s) for s in protocol.SEEDS}))
    assert passed(c, res) == {"(a)": False, "(b)": False}


def test_c07_missing(claims):
    c = claims["c07"]
    res = fake(c, by_arm(C07_PASS), skip=("learned",))
    assert passed(c, res) == {"(a)": None, "(b)": None}


# ---------------------------------------------------------------- claim 8


C08_PASS = {"ff1": 4.00, "ff2": 4.00, "ff4": 4.02, "ff8": 4.08, "ff16": 4.20,
            "L1_d256": 4.30, "L2_d192": 4.00, "L4_d128": 4.05, "L8_d96": 4.10, "L16_d64": 4.20}


def test_c08_param_match_within_15_percent_and_closest(claims):
    m = runner.module_of(claims["c08"])
    base = accounting.param_counts(protocol.model_s())["non_embedding"]
    for arm, rel in m.param_match().items():
        assert abs(rel) <= 0.15, arm
    for ratio, (d, heads) in m.RATIOS.items():
        cfg = m.ratio_model(ratio)
        assert cfg.activation == "gelu" and cfg.resolved_d_ff == ratio * d and cfg.n_heads * cfg.resolved_head_dim == d
        assert cfg.resolved_head_dim == 32 if d % 32 == 0 else heads == 4
        # d_model is the multiple of 8 with N closest to S's
        def gap(x, ratio=ratio):
            model = protocol.model_s(activation="gelu", d_model=x, d_ff=ratio * x, n_heads=4)
            return abs(accounting.param_counts(model)["non_embedding"] - base)
        assert d == min(range(32, 512, 8), key=gap), ratio
    for layers, d in m.SHAPES:
        cfg = m.shape_model(layers, d)
        assert cfg.n_layers == layers and cfg.resolved_head_dim == 32 and cfg.activation == "swiglu"
    assert len(claims["c08"].runs("cpu")) == 10 * 3


def test_c08_pass(claims):
    c = claims["c08"]
    assert passed(c, fake(c, by_arm(C08_PASS))) == {"(a)": True, "(b)": True}


def test_c08_fail(claims):
    c = claims["c08"]
    # ff4 2.5% above the best; an 8-layer shape 5% above the best
    res = fake(c, by_arm({**C08_PASS, "ff4": 4.10, "L8_d96": 4.20}))
    assert passed(c, res) == {"(a)": False, "(b)": False}
    # ff16 only equal to ff4; the 1-layer shape is the best
    res = fake(c, by_arm({**C08_PASS, "ff16": 4.025, "L1_d256": 3.90}))
    assert passed(c, res) == {"(a)": False, "(b)": False}
    # 1 layer worse, but by less than 3%
    res = fake(c, by_arm({**C08_PASS, "L1_d256": 4.10}))
    assert passed(c, res)["(b)"] is False


def test_c08_diverged(claims):
    c = claims["c08"]
    # ff16 and the 1-layer shape diverged in every seed: ln V, worse, so still a pass
    every = {(arm, s) for arm in ("ff16", "L1_d256") for s in protocol.SEEDS}
    res = fake(c, by_arm(C08_PASS, diverged=every))
    assert passed(c, res) == {"(a)": True, "(b)": True}
    # one diverged seed each: the spread makes them only "equal" by the comparison rule, so both fail
    res = fake(c, by_arm(C08_PASS, diverged={("ff16", 0), ("L1_d256", 2)}))
    assert passed(c, res) == {"(a)": False, "(b)": False}
    # a diverged ff4 / 4-layer seed: no longer within 1% / 3% of the best
    res = fake(c, by_arm(C08_PASS, diverged={("ff4", 1), ("L4_d128", 1)}))
    assert passed(c, res) == {"(a)": False, "(b)": False}


def test_c08_missing(claims):
    c = claims["c08"]
    assert passed(c, fake(c, by_arm(C08_PASS), skip=("ff8", "L16_d64"))) == {"(a)": None, "(b)": None}


# ---------------------------------------------------------------- claim 13


C13_PASS = {"mha": 4.00, "gqa": 4.01, "mqa": 4.05}


def kv13(bad: str | None = None):
    def measure(spec):
        mcfg = spec.config.model
        acc = accounting.kv_cache_bytes(mcfg, spec.args["batch"], spec.args["context"])
        return {"measured_bytes": acc + (64 if spec.tags["arm"] == bad else 0), "accounting_bytes": acc,
                "context": spec.args["context"], "batch": spec.args["batch"]}
    return measure


def speed13(tps: dict):
    def measure(spec):
        return {"tokens_per_s": tps, "rounds_tokens_per_s": {a: [v] * 7 for a, v in tps.items()},
                "context": 1024, "new_tokens": 64, "batch": 8, "rounds": 7}
    return measure


FAST = {"mha": 300.0, "gqa": 1100.0, "mqa": 1300.0}


def test_c13_param_match_within_2_percent(claims):
    m = runner.module_of(claims["c13"])
    base = accounting.param_counts(m.arm_model("mha"))["non_embedding"]
    for arm, (kv, ff) in m.ARMS.items():
        cfg = m.arm_model(arm)
        assert cfg.n_heads == 8 and cfg.resolved_head_dim == 16 and cfg.resolved_n_kv_heads == kv
        n = accounting.param_counts(cfg)["non_embedding"]
        assert abs(n / base - 1) <= 0.02, arm
        # the closest d_ff
        def gap(f, cfg=cfg):
            return abs(accounting.param_counts(dataclasses.replace(cfg, d_ff=f))["non_embedding"] - base)
        assert ff == min(range(256, 640), key=gap), arm
    assert m.ARMS["mha"][1] == protocol.model_s(n_heads=8).resolved_d_ff
    # the kv caches of the grid are exactly 8 : 2 : 1 by the accounting
    kv = {a: accounting.kv_cache_bytes(m.arm_model(a), 1, 1024) for a in m.ARMS}
    assert kv["mha"] == 4 * kv["gqa"] == 8 * kv["mqa"]


def test_c13_grid(claims):
    specs = claims["c13"].runs("cpu")
    assert sum(s.measure == "train" for s in specs) == 9
    assert [s.tags["arm"] for s in specs if s.measure == "kv_cache"] == ["mha", "gqa", "mqa"]
    (dec,) = [s for s in specs if s.measure == "decode_speed"]
    assert dec.exclusive and dec.args["context"] == 1024 and set(dec.args["arms"]) == {"mha", "gqa", "mqa"}


def test_c13_pass(claims):
    c = claims["c13"]
    res = fake(c, by_arm(C13_PASS), {"kv_cache": kv13(), "decode_speed": speed13(FAST)})
    assert passed(c, res) == {"(a)": True, "(b)": True, "(c)": True}
    assert "MQA decodes" in c.key_number(res)


def test_c13_fail(claims):
    c = claims["c13"]
    res = fake(c, by_arm({**C13_PASS, "mqa": 4.10}), {"kv_cache": kv13(bad="gqa"),
                                                     "decode_speed": speed13({**FAST, "gqa": 250.0})})
    assert passed(c, res) == {"(a)": False, "(b)": False, "(c)": False}
    # MQA within 2% but GQA worse than MQA
    res = fake(c, by_arm({**C13_PASS, "gqa": 4.10}), {"kv_cache": kv13(), "decode_speed": speed13(FAST)})
    assert passed(c, res)["(c)"] is False
    # equal speeds are non-decreasing
    res = fake(c, by_arm(C13_PASS), {"kv_cache": kv13(), "decode_speed": speed13({a: 500.0 for a in FAST})})
    assert passed(c, res)["(b)"] is True


def test_c13_diverged_and_missing(claims):
    c = claims["c13"]
    res = fake(c, by_arm(C13_PASS, diverged={("mqa", 0)}), {"kv_cache": kv13(), "decode_speed": speed13(FAST)})
    assert passed(c, res)["(c)"] is False
    res = fake(c, by_arm(C13_PASS), skip=("gqa", "decode"))
    assert passed(c, res) == {"(a)": None, "(b)": None, "(c)": None}


# ---------------------------------------------------------------- claim 14


WIN_PASS = {256: 4.00, 128: 4.01, 64: 4.05, 32: 4.20}


def windows14(table):
    def extra(spec):
        if spec.tags["arm"] != "full":
            return {}
        return {"evals": {f"window_{w}": v for w, v in table.items()}}
    return extra


def kv14(scale_full: float = 1.0, bad: bool = False):
    def measure(spec):
        mcfg, ctx = spec.config.model, spec.args["context"]
        acc = accounting.kv_cache_bytes(mcfg, 1, ctx)
        measured = acc + (64 if bad and spec.tags["arm"] == "local_global" else 0)
        if spec.tags["arm"] == "full":
            measured = acc = int(acc * scale_full)
        return {"measured_bytes": measured, "accounting_bytes": acc, "context": ctx,
                "slots_per_layer": [ctx] * mcfg.n_layers}
    return measure


def test_c14_grid_and_kv_expectation(claims):
    m = runner.module_of(claims["c14"])
    specs = claims["c14"].runs("cpu")
    full = [s for s in specs if s.measure == "train" and s.tags["arm"] == "full"]
    assert len(full) == 3 and all(s.args["eval_windows"] == [256, 128, 64, 32] for s in full)
    lg = [s for s in specs if s.measure == "train" and s.tags["arm"] == "local_global"][0].config.model
    assert lg.layer_pattern == ("local", "local", "local", "global") and lg.sliding_window == 64
    kv = {s.tags["arm"]: accounting.kv_cache_bytes(s.config.model, 1, 4096) for s in specs if s.measure == "kv_cache"}
    assert kv["local_global"] / kv["full"] == pytest.approx((3 * 64 + 4096) / (4 * 4096))
    # the quick shrink keeps a 4-layer pattern whole (protocol.quick alone would raise); others unchanged
    q = protocol.quick(specs[3].config).model
    assert q.n_layers == 4 and q.layer_pattern == lg.layer_pattern and q.vocab_size == 259
    assert protocol.quick(full[0].config).model.n_layers == 2
    assert m.LR == 3e-3


def test_c14_pass(claims):
    c = claims["c14"]
    res = fake(c, by_arm({"full": 4.00, "local_global": 4.02}, extra=windows14(WIN_PASS)), {"kv_cache": kv14()})
    assert passed(c, res) == {"(a)": True, "(b)": True, "(c)": True}


def test_c14_fail(claims):
    c = claims["c14"]
    # the loss falls from window 128 to 64 (not monotone); local/global 2.5% worse; the full cache too small
    res = fake(c, by_arm({"full": 4.00, "local_global": 4.10}, extra=windows14({**WIN_PASS, 64: 4.005})),
               {"kv_cache": kv14(scale_full=0.5)})
    assert passed(c, res) == {"(a)": False, "(b)": False, "(c)": False}
    # monotone but window 64 costs 3%; measured cache differs from the accounting
    res = fake(c, by_arm({"full": 4.00, "local_global": 4.02}, extra=windows14({**WIN_PASS, 64: 4.12})),
               {"kv_cache": kv14(bad=True)})
    assert passed(c, res) == {"(a)": False, "(b)": True, "(c)": False}


def test_c14_diverged_and_missing(claims):
    c = claims["c14"]

    def extra(spec):  # a diverged run has no params, so no evals
        return {} if spec.tags["seed"] == 1 else windows14(WIN_PASS)(spec)

    res = fake(c, by_arm({"full": 4.00, "local_global": 4.02}, diverged={("full", 1)}, extra=extra),
               {"kv_cache": kv14()})
    assert passed(c, res)["(a)"] is False
    res = fake(c, by_arm({"full": 4.00, "local_global": 4.02}, diverged={("local_global", 2)},
                         extra=windows14(WIN_PASS)), {"kv_cache": kv14()})
    assert passed(c, res) == {"(a)": True, "(b)": False, "(c)": True}
    res = fake(c, by_arm({"full": 4.00, "local_global": 4.02}, extra=windows14(WIN_PASS)))
    assert passed(c, res) == {"(a)": True, "(b)": True, "(c)": None}


# ---------------------------------------------------------------- claim 15


def c15(losses: dict, gaps: dict, diverged=None):
    """A train(spec) for fake(): final losses per arm and a training-loss tail `gap` above each."""
    def extra(spec):
        return {"train_loss_tail": losses[spec.tags["arm"]] + JITTER[spec.tags["seed"]] + gaps[spec.tags["arm"]]}
    return by_arm(losses, diverged=diverged, extra=extra)


def test_c15_grid(claims):
    specs = claims["c15"].runs("cpu")
    assert len(specs) == 6 and all(s.config.train.log_every == 1 for s in specs)
    drop = [s.config.model for s in specs if s.tags["arm"] == "dropout"][0]
    assert (drop.embed_dropout, drop.resid_dropout, drop.attn_dropout) == (0.1, 0.1, 0.1)
    # a single epoch: the run reads far fewer tokens than the corpus has (checked in the docstring)
    assert protocol.STEPS * protocol.BATCH * (protocol.SEQ_LEN + 1) < runner.module_of(claims["c15"]).TRAIN_TOKENS


def test_c15_pass(claims):
    c = claims["c15"]
    res = fake(c, c15({"none": 4.00, "dropout": 4.05}, {"none": 0.0, "dropout": 0.03}))
    assert passed(c, res) == {"(a)": True, "(b)": True}
    # a gap 0.019 smaller still passes
    res = fake(c, c15({"none": 4.00, "dropout": 4.05}, {"none": 0.0, "dropout": -0.019}))
    assert passed(c, res)["(b)"] is True


def test_c15_fail(claims):
    c = claims["c15"]
    res = fake(c, c15({"none": 4.00, "dropout": 3.90}, {"none": 0.0, "dropout": -0.05}))
    assert passed(c, res) == {"(a)": False, "(b)": False}


def test_c15_diverged_and_missing(claims):
    c = claims["c15"]
    res = fake(c, c15({"none": 4.00, "dropout": 4.05}, {"none": 0.0, "dropout": 0.0}, diverged={("dropout", 0)}))
    # a diverged dropout run (ln V) is not better; it has no gap, so (b) fails
    out = passed(c, res)
    assert out == {"(a)": True, "(b)": False}
    res = fake(c, by_arm({"none": 4.00, "dropout": 4.05}), skip=("dropout",))
    assert passed(c, res) == {"(a)": None, "(b)": None}
