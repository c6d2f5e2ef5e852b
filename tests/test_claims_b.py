"""Claims 7, 8, 13, 14 and 15 (protocol v2): each criterion judged on small synthetic records where the
answer is known. For every criterion a case that passes, one that fails and, for the paired ones, one that
is inconclusive; missing runs (and an unknown baseline LR) give None; the grids hold 4 seeds of every arm.
No training here: the quick paths run in tests/test_experiment_runner.py."""

import dataclasses
import math

import pytest

from lecture3 import accounting
from lecture3.experiment import protocol, runner
from lecture3.experiment.spec import Results

LN_V = math.log(2048)
# per-seed offsets every arm shares: a paired difference of two arms given as numbers is exact (CI of width 0)
JITTER = (-0.004, 0.0, 0.004, 0.002)
SIGNS = (1, -1, 1, -1)
BEST = 3e-3
BASE = {1e-3: 4.10, 3e-3: 4.00, 1e-2: 4.20}  # the baseline's final losses by LR: its best LR is BEST


def noisy(x: float, k: float) -> tuple:
    """Per-seed losses around x whose paired differences to a plain number are ±k: mean 0, 95% CI ±1.84 k."""
    return tuple(x + j + k * s for j, s in zip(JITTER, SIGNS, strict=True))


def loss_of(value, seed: int, lr: float | None = None) -> float:
    """A number (plus the shared jitter), per-seed values (a tuple) or per-LR values (a dict)."""
    if isinstance(value, dict):
        value = value[lr]
    return value[seed] if isinstance(value, tuple) else value + JITTER[seed]


@pytest.fixture(autouse=True)
def best_lr(monkeypatch):
    """The baseline's best LR as `protocol` knows it from the shared records: BEST unless a test changes it."""
    monkeypatch.setattr(protocol, "baseline_best_lr", lambda scale: BEST)
    return monkeypatch


def unknown_lr(monkeypatch):
    monkeypatch.setattr(protocol, "baseline_best_lr", lambda scale: None)


@pytest.fixture(scope="module")
def claims():
    return {n: runner.load(n) for n in ("c07", "c08", "c13", "c14", "c15")}


def train_result(loss: float, diverged: bool = False, **extra) -> dict:
    res = {"final_val_loss": None if diverged else loss, "final_loss": LN_V if diverged else loss,
           "diverged": diverged, "diverged_step": 17 if diverged else None, "initial_loss": LN_V,
           "train_loss_tail": None if diverged else loss, "steps": protocol.STEPS, "tokens": 1_228_800,
           "history": []}
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
            records[s.key] = {"result": train_result(loss, diverged, **extra)}
        elif measures and s.measure in measures:
            records[s.key] = {"result": measures[s.measure](s)}
    return Results(specs, records)


def by_arm(losses: dict, diverged=(), extra=None):
    """A train(spec) for fake(): the loss of each arm (see loss_of; the baseline's are BASE unless given),
    the (arm, seed) pairs that diverged, extra result fields."""
    losses = {"baseline": BASE, **losses}

    def train(spec):
        arm, seed = spec.tags["arm"], spec.tags["seed"]
        return loss_of(losses[arm], seed, spec.tags.get("lr")), (arm, seed) in diverged, (
            {} if extra is None else extra(spec))

    return train


def outcomes(claim, results) -> dict:
    return {c.name: c.outcome for c in claim.criteria(results)}


def arms_of(specs, measure="train") -> dict:
    """arm -> the seeds of its runs (at the one LR it runs at, or every LR for the baseline)."""
    out: dict = {}
    for s in specs:
        if s.measure == measure:
            out.setdefault(s.tags["arm"], []).append(s.tags.get("seed"))
    return out


def check_baseline_grid(specs) -> None:
    """S's 12 runs, the LR grid x 4 seeds, tagged arm baseline (protocol.baseline_specs)."""
    base = [s for s in specs if s.tags.get("arm") == "baseline"]
    assert sorted((s.tags["lr"], s.tags["seed"]) for s in base) == sorted(
        (lr, seed) for lr in protocol.LRS for seed in protocol.SEEDS)
    assert all(s.config.model == protocol.model_s() and s.config.train.lr == s.tags["lr"] for s in base)


def test_four_seeds():
    assert protocol.SEEDS == (0, 1, 2, 3) and len(JITTER) == len(protocol.SEEDS)


# ---------------------------------------------------------------- claim 7


C07 = {"rope": 4.00, "sinusoidal": 4.10, "learned": 4.10, "alibi": 4.00, "relative": 4.005, "none": 4.20}


def _long(spec):
    return {"evals": {"seq_len_512": 4.3}} if spec.args.get("eval_seq_lens") else {}


def test_c07_grid(claims, best_lr):
    specs = claims["c07"].runs("cpu")
    check_baseline_grid(specs)
    arms = arms_of(specs)
    assert set(arms) == {"baseline", *C07}
    assert all(sorted(arms[a]) == list(protocol.SEEDS) for a in C07)
    for s in specs:
        if s.tags["arm"] == "baseline":
            continue
        assert s.config.data.seq_len == 256 and s.config.train.batch_size * 256 == 16 * 128
        assert s.config.train.lr == s.tags["lr"] == BEST and s.config.train.steps == protocol.STEPS
        assert s.config.model.max_seq_len >= 512
        assert ("eval_seq_lens" in s.args) == (s.tags["arm"] != "learned")
    best_lr.setattr(protocol, "baseline_best_lr", lambda scale: 1e-2)
    assert {s.config.train.lr for s in claims["c07"].runs("cpu") if s.tags["arm"] != "baseline"} == {1e-2}
    assert claims["c07"].baseline == {"arm": "rope"}


def test_c07_pass(claims):
    c = claims["c07"]
    res = fake(c, by_arm(C07, extra=_long))
    assert outcomes(c, res) == {"(a)": "pass", "(b)": "pass"}
    obs = " ".join(c.observations(res))
    assert "T = 512" in obs and "rope 4.3000" in obs and "learned 4.3" not in obs and f"{BEST:g}" in obs
    assert c.key_number(res).startswith("rope 4.00")


def test_c07_fail(claims):
    c = claims["c07"]
    # rope 2.5% worse than alibi (a); rope worse than learned (b)
    assert outcomes(c, fake(c, by_arm({**C07, "alibi": 3.90, "learned": 3.95}))) == {"(a)": "fail", "(b)": "fail"}
    # every rope seed diverged (ln V): worse than all
    every = {("rope", s) for s in protocol.SEEDS}
    assert outcomes(c, fake(c, by_arm(C07, diverged=every))) == {"(a)": "fail", "(b)": "fail"}


def test_c07_inconclusive(claims):
    c = claims["c07"]
    # alibi and learned as good as rope on average, with a spread: neither rule decides
    res = fake(c, by_arm({**C07, "alibi": noisy(4.00, 0.05), "learned": noisy(4.00, 0.05)}))
    assert outcomes(c, res) == {"(a)": "inconclusive", "(b)": "inconclusive"}
    # learned diverged in every seed (ln V): rope is better than it, still a pass
    every = {("learned", s) for s in protocol.SEEDS}
    assert outcomes(c, fake(c, by_arm(C07, diverged=every))) == {"(a)": "pass", "(b)": "pass"}


def test_c07_missing(claims, best_lr):
    c = claims["c07"]
    assert outcomes(c, fake(c, by_arm(C07), skip=("learned",))) == {"(a)": None, "(b)": None}
    assert outcomes(c, fake(c, by_arm(C07), skip=("baseline",))) == {"(a)": None, "(b)": None}
    unknown_lr(best_lr)  # the baseline's runs not yet recorded: the grid is them alone
    assert set(arms_of(c.runs("cpu"))) == {"baseline"}
    assert outcomes(c, fake(c, by_arm(C07))) == {"(a)": None, "(b)": None}


# ---------------------------------------------------------------- claim 8


C08 = {"ff1": 4.00, "ff2": 4.00, "ff4": 4.02, "ff8": 4.08, "ff16": 4.20,
       "L1_d256": 4.30, "L2_d192": 4.00, "L4_d128": 4.05, "L8_d96": 4.10, "L16_d64": 4.20}
C08_PASS = {"(a)": "pass", "(b)": "pass", "(c)": "pass", "(d)": "pass"}


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


def test_c08_grid(claims):
    specs = claims["c08"].runs("cpu")
    arms = arms_of(specs)
    assert set(arms) == set(C08) and all(sorted(v) == list(protocol.SEEDS) for v in arms.values())
    assert len(specs) == len(C08) * len(protocol.SEEDS)
    assert {(s.config.train.lr, s.config.train.steps) for s in specs} == {(3e-3, protocol.STEPS)}
    # the shape (4, 128) is model S, the claim's baseline arm
    (s4,) = {s.config.model for s in specs if s.tags["arm"] == "L4_d128"}
    assert s4 == protocol.model_s() and claims["c08"].baseline == {"arm": "L4_d128"}


def test_c08_pass(claims):
    c = claims["c08"]
    assert outcomes(c, fake(c, by_arm(C08))) == C08_PASS
    assert "vs best (ff1)" in c.key_number(fake(c, by_arm(C08)))
    # ff4 the best ratio itself: d = 0, not worse
    assert outcomes(c, fake(c, by_arm({**C08, "ff4": 3.99})))["(a)"] == "pass"


def test_c08_fail(claims):
    c = claims["c08"]
    # ff4 2.5% above the best ratio; ff16 better than ff4; an 8-layer shape 5% above the best; 1 layer only
    # 2.5% above the best
    res = fake(c, by_arm({**C08, "ff4": 4.10, "ff16": 4.05, "L8_d96": 4.20, "L1_d256": 4.10}))
    assert outcomes(c, res) == {"(a)": "fail", "(b)": "fail", "(c)": "fail", "(d)": "fail"}
    # the 1-layer shape is the best: d = 0, not worse by more than 3%
    assert outcomes(c, fake(c, by_arm({**C08, "L1_d256": 3.90})))["(d)"] == "fail"


def test_c08_inconclusive(claims):
    c = claims["c08"]
    res = fake(c, by_arm({**C08, "ff4": noisy(4.02, 0.05), "ff16": 4.02, "L8_d96": noisy(4.10, 0.1),
                          "L1_d256": noisy(4.12, 0.05)}))
    assert outcomes(c, res) == {"(a)": "inconclusive", "(b)": "inconclusive", "(c)": "inconclusive",
                                "(d)": "inconclusive"}


def test_c08_diverged(claims):
    c = claims["c08"]
    # ff16 and the 1-layer shape diverged in every seed: ln V, worse, so still a pass
    every = {(arm, s) for arm in ("ff16", "L1_d256") for s in protocol.SEEDS}
    assert outcomes(c, fake(c, by_arm(C08, diverged=every))) == C08_PASS
    # every 4-layer seed diverged: far worse than the best shape
    every = {("L4_d128", s) for s in protocol.SEEDS}
    assert outcomes(c, fake(c, by_arm(C08, diverged=every)))["(c)"] == "fail"


def test_c08_missing(claims):
    c = claims["c08"]
    res = fake(c, by_arm(C08), skip=("ff8", "L16_d64"))
    assert outcomes(c, res) == {"(a)": None, "(b)": "pass", "(c)": None, "(d)": None}
    assert outcomes(c, fake(c, by_arm(C08), skip=("ff16",)))["(b)"] is None


# ---------------------------------------------------------------- claim 13


C13 = {"mha": 4.00, "gqa": 4.01, "mqa": 4.05}
ROUND_JITTER = (0.0, 1e-5, -1e-5, 2e-5, 0.0, -2e-5, 1e-5)  # 7 rounds, shared by the arms
FAST = {"mha": 3e-3, "gqa": 1e-3, "mqa": 1e-3}  # seconds per decoded token


def kv13(bad: str | None = None, double: str | None = None):
    """Measured = accounting, except `bad` (64 bytes more) and `double` (both doubled: ratio off)."""
    def measure(spec):
        acc = accounting.kv_cache_bytes(spec.config.model, spec.args["batch"], spec.args["context"])
        acc *= 2 if spec.tags["arm"] == double else 1
        return {"measured_bytes": acc + (64 if spec.tags["arm"] == bad else 0), "accounting_bytes": acc,
                "context": spec.args["context"], "batch": spec.args["batch"]}
    return measure


def speed13(per_token: dict):
    """A decode record: each arm's seconds per token in each round (a number plus the shared jitter, or a
    tuple of rounds)."""
    def measure(spec):
        rounds = {a: list(v) if isinstance(v, tuple) else [v + j for j in ROUND_JITTER] for a, v in per_token.items()}
        return {"rounds_s_per_token": rounds, "median_s_per_token": {a: sorted(v)[3] for a, v in rounds.items()},
                "context": 1024, "new_tokens": 64, "batch": 8, "rounds": 7}
    return measure


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


def test_c13_grid(claims, best_lr):
    specs = claims["c13"].runs("cpu")
    check_baseline_grid(specs)
    arms = arms_of(specs)
    assert set(arms) == {"baseline", *C13} and all(sorted(arms[a]) == list(protocol.SEEDS) for a in C13)
    assert {s.config.train.lr for s in specs if s.measure == "train" and s.tags["arm"] in C13} == {BEST}
    assert [s.tags["arm"] for s in specs if s.measure == "kv_cache"] == ["mha", "gqa", "mqa"]
    (dec,) = [s for s in specs if s.measure == "decode_speed"]
    assert dec.exclusive and dec.args["rounds"] >= 7 and dec.args["context"] == 1024
    assert set(dec.args["arms"]) == {"mha", "gqa", "mqa"}
    assert claims["c13"].baseline == {"arm": "mha"}
    unknown_lr(best_lr)  # the measures do not wait for the LR; the arms do
    assert set(arms_of(claims["c13"].runs("cpu"))) == {"baseline"}
    assert len([s for s in claims["c13"].runs("cpu") if s.measure != "train"]) == 4


def test_c13_pass(claims):
    c = claims["c13"]
    res = fake(c, by_arm(C13), {"kv_cache": kv13(), "decode_speed": speed13(FAST)})
    assert outcomes(c, res) == {"(a)": "pass", "(b)": "pass", "(c)": "pass"}
    assert "MQA decodes 3.00x MHA" in c.key_number(res)


def test_c13_fail(claims):
    c = claims["c13"]
    # measured bytes differ from the accounting; GQA slower than MHA; MQA 2.5% worse than MHA
    res = fake(c, by_arm({**C13, "mqa": 4.10}), {"kv_cache": kv13(bad="gqa"),
                                                "decode_speed": speed13({**FAST, "gqa": 4e-3})})
    assert outcomes(c, res) == {"(a)": "fail", "(b)": "fail", "(c)": "fail"}
    # measured = accounting, but not 8 : 2 : 1; MQA 10% slower than GQA; GQA 1.25% worse than MHA
    res = fake(c, by_arm({**C13, "gqa": 4.05}), {"kv_cache": kv13(double="mqa"),
                                                "decode_speed": speed13({**FAST, "mqa": 1.1e-3})})
    assert outcomes(c, res) == {"(a)": "fail", "(b)": "fail", "(c)": "fail"}


def test_c13_inconclusive(claims):
    c = claims["c13"]
    spread = tuple(3e-3 + (5e-4 if r % 2 else -5e-4) for r in range(7))  # GQA as fast as MHA on average
    res = fake(c, by_arm({**C13, "mqa": noisy(4.05, 0.05)}), {"kv_cache": kv13(),
                                                              "decode_speed": speed13({**FAST, "gqa": spread})})
    assert outcomes(c, res) == {"(a)": "pass", "(b)": "inconclusive", "(c)": "inconclusive"}


def test_c13_missing(claims, best_lr):
    c = claims["c13"]
    res = fake(c, by_arm(C13), skip=("gqa", "decode"))
    assert outcomes(c, res) == {"(a)": None, "(b)": None, "(c)": None}
    unknown_lr(best_lr)
    res = fake(c, by_arm(C13), {"kv_cache": kv13(), "decode_speed": speed13(FAST)})
    assert outcomes(c, res) == {"(a)": "pass", "(b)": "pass", "(c)": None}


# ---------------------------------------------------------------- claim 14


WIN = {256: 4.00, 128: 4.01, 64: 4.05, 32: 4.20}
C14 = {"full": 4.00, "local_global": 4.02}


def windows14(table):
    def extra(spec):
        if spec.tags["arm"] != "full":
            return {}
        return {"evals": {f"window_{w}": loss_of(v, spec.tags["seed"]) for w, v in table.items()}}
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


def test_c14_grid_and_kv_expectation(claims, best_lr):
    specs = claims["c14"].runs("cpu")
    check_baseline_grid(specs)
    arms = arms_of(specs)
    assert set(arms) == {"baseline", *C14} and all(sorted(arms[a]) == list(protocol.SEEDS) for a in C14)
    trained = [s for s in specs if s.measure == "train" and s.tags["arm"] in C14]
    assert {(s.config.train.lr, s.config.data.seq_len, s.config.train.batch_size) for s in trained} == {(BEST, 256, 8)}
    full = [s for s in trained if s.tags["arm"] == "full"]
    assert all(s.args["eval_windows"] == [256, 128, 64, 32] for s in full)
    lg = [s for s in trained if s.tags["arm"] == "local_global"][0].config.model
    assert lg.layer_pattern == ("local", "local", "local", "global") and lg.sliding_window == 64
    kv = {s.tags["arm"]: accounting.kv_cache_bytes(s.config.model, 1, 4096) for s in specs if s.measure == "kv_cache"}
    assert kv["local_global"] / kv["full"] == pytest.approx((3 * 64 + 4096) / (4 * 4096))
    # the quick shrink keeps a 4-layer pattern whole; others unchanged
    lg_spec = [s for s in trained if s.tags["arm"] == "local_global"][0]
    q = protocol.quick(lg_spec.config).model
    assert q.n_layers == 4 and q.layer_pattern == lg.layer_pattern and q.vocab_size == 259
    assert protocol.quick(full[0].config).model.n_layers == 2
    assert claims["c14"].baseline == {"arm": "full"}
    unknown_lr(best_lr)
    assert set(arms_of(claims["c14"].runs("cpu"))) == {"baseline"}


def test_c14_pass(claims):
    c = claims["c14"]
    res = fake(c, by_arm(C14, extra=windows14(WIN)), {"kv_cache": kv14()})
    assert outcomes(c, res) == {"(a)": "pass", "(b)": "pass", "(c)": "pass"}
    assert c.key_number(res).startswith("window 64 +1.25%")


def test_c14_fail(claims):
    c = claims["c14"]
    # the loss falls from window 128 to 64 (not monotone); local/global 2.5% worse; the full cache too small
    res = fake(c, by_arm({**C14, "local_global": 4.10}, extra=windows14({**WIN, 64: 4.005})),
               {"kv_cache": kv14(scale_full=0.5)})
    assert outcomes(c, res) == {"(a)": "fail", "(b)": "fail", "(c)": "fail"}
    # monotone, but window 64 costs 3%; measured cache differs from the accounting
    res = fake(c, by_arm(C14, extra=windows14({**WIN, 64: 4.12})), {"kv_cache": kv14(bad=True)})
    assert outcomes(c, res) == {"(a)": "fail", "(b)": "pass", "(c)": "fail"}
    # every local/global seed diverged (ln V)
    every = {("local_global", s) for s in protocol.SEEDS}
    assert outcomes(c, fake(c, by_arm(C14, diverged=every, extra=windows14(WIN))))["(b)"] == "fail"


def test_c14_inconclusive(claims):
    c = claims["c14"]
    res = fake(c, by_arm({**C14, "local_global": noisy(4.02, 0.05)}, extra=windows14({**WIN, 64: noisy(4.05, 0.05)})),
               {"kv_cache": kv14()})
    assert outcomes(c, res) == {"(a)": "inconclusive", "(b)": "inconclusive", "(c)": "pass"}


def test_c14_diverged_and_missing(claims, best_lr):
    c = claims["c14"]

    def extra(spec):  # a diverged run has no params, so no evals
        return {} if spec.tags["seed"] == 1 else windows14(WIN)(spec)

    res = fake(c, by_arm(C14, diverged={("full", 1)}, extra=extra), {"kv_cache": kv14()})
    assert outcomes(c, res)["(a)"] == "fail"
    res = fake(c, by_arm(C14, extra=windows14(WIN)))
    assert outcomes(c, res) == {"(a)": "pass", "(b)": "pass", "(c)": None}
    res = fake(c, by_arm(C14, extra=windows14(WIN)), {"kv_cache": kv14()}, skip=("full",))  # its kv measure too
    assert outcomes(c, res) == {"(a)": None, "(b)": None, "(c)": None}
    unknown_lr(best_lr)
    res = fake(c, by_arm(C14, extra=windows14(WIN)), {"kv_cache": kv14()})
    assert outcomes(c, res) == {"(a)": None, "(b)": None, "(c)": "pass"}


# ---------------------------------------------------------------- claim 15


C15 = {"dropout": 4.05}  # the arm without dropout is the baseline at its best LR: 4.00


def history(val: float, gap: float) -> list[dict]:
    """A log every 10 steps: far off before the last 10% of the steps, val + gap in them."""
    start = protocol.STEPS * 0.9
    return [{"step": st, "loss": val + gap if st > start else 9.0} for st in range(10, protocol.STEPS + 1, 10)]


def c15(losses: dict, gaps: dict, diverged=()):
    """A train(spec) for fake(): final losses per arm and a train-val gap per arm (a number, or per seed)."""
    losses = {"baseline": BASE, **losses}

    def extra(spec):
        arm, seed = spec.tags["arm"], spec.tags["seed"]
        g = gaps.get(arm, 0.0)
        return {"history": history(loss_of(losses[arm], seed, spec.tags["lr"]), g[seed] if isinstance(g, tuple) else g)}

    return by_arm(losses, diverged=diverged, extra=extra)


def test_c15_grid(claims, best_lr):
    m = runner.module_of(claims["c15"])
    specs = claims["c15"].runs("cpu")
    check_baseline_grid(specs)
    arms = arms_of(specs)
    assert set(arms) == {"baseline", "dropout"} and sorted(arms["dropout"]) == list(protocol.SEEDS)
    drop = [s for s in specs if s.tags["arm"] == "dropout"]
    base = {s.tags["seed"]: s for s in specs if s.tags["arm"] == "baseline" and s.tags["lr"] == BEST}
    for s in drop:
        model = s.config.model
        assert (model.embed_dropout, model.resid_dropout, model.attn_dropout) == (0.1, 0.1, 0.1)
        # the arm without dropout is S at the same LR and seed: the baseline's run
        assert s.config.replace(model=base[s.tags["seed"]].config.model) == base[s.tags["seed"]].config
    # a single epoch: a run reads far fewer tokens than the corpus has
    assert protocol.STEPS * protocol.BATCH * (protocol.SEQ_LEN + 1) < m.TRAIN_TOKENS
    assert claims["c15"].baseline == {"arm": "baseline"}
    unknown_lr(best_lr)
    assert set(arms_of(claims["c15"].runs("cpu"))) == {"baseline"}


def test_c15_gap_is_the_last_10_percent():
    m = runner.module_of(runner.load("c15"))
    res = train_result(4.0, history=history(4.0, 0.03), train_loss_tail=99.0)
    assert m.gap(res) == pytest.approx(0.03)
    assert m.gap(train_result(4.0, diverged=True, history=history(4.0, 0.03))) is None


def test_c15_pass(claims):
    c = claims["c15"]
    res = fake(c, c15(C15, {"baseline": 0.0, "dropout": 0.03}))
    assert outcomes(c, res) == {"(a)": "pass", "(b)": "pass"}
    assert c.key_number(res) == "Δ(dropout − none) = +0.050 nats"
    # a gap 0.019 smaller with dropout still passes
    assert outcomes(c, fake(c, c15(C15, {"dropout": -0.019})))["(b)"] == "pass"


def test_c15_fail(claims):
    c = claims["c15"]
    # dropout 2.5% better; its gap 0.05 larger than without (gap_none − gap_dropout = +0.05)
    res = fake(c, c15({"dropout": 3.90}, {"baseline": 0.0, "dropout": -0.05}))
    assert outcomes(c, res) == {"(a)": "fail", "(b)": "fail"}
    # a diverged dropout run has no gap
    assert outcomes(c, fake(c, c15(C15, {}, diverged={("dropout", 0)})))["(b)"] == "fail"


def test_c15_inconclusive(claims):
    c = claims["c15"]
    res = fake(c, c15({"dropout": noisy(4.00, 0.05)}, {"dropout": tuple(0.03 * s for s in SIGNS)}))
    assert outcomes(c, res) == {"(a)": "inconclusive", "(b)": "inconclusive"}


def test_c15_missing(claims, best_lr):
    c = claims["c15"]
    assert outcomes(c, fake(c, c15(C15, {}), skip=("dropout",))) == {"(a)": None, "(b)": None}
    assert outcomes(c, fake(c, c15(C15, {}), skip=("baseline",))) == {"(a)": None, "(b)": None}
    unknown_lr(best_lr)
    assert outcomes(c, fake(c, c15(C15, {}))) == {"(a)": None, "(b)": None}
