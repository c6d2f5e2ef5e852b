"""The pieces both training loops share (`lecture3.training`, `lecture3.meter.Throughput`): what a record holds,
when a step logs, evaluates and saves, how the clock counts tokens."""

import math

import numpy as np
import pytest

from lecture3 import meter, training
from lecture3.config import TrainConfig


def test_the_cadence_logs_evaluates_and_saves_on_their_own_steps_and_all_three_at_the_end():
    tcfg = TrainConfig(steps=12, log_every=3, eval_every=4, checkpoint_every=6)
    got = {d: training.due(tcfg, d, checkpoints=True) for d in range(1, 13)}
    assert [d for d, w in got.items() if w.log] == [3, 6, 9, 12]
    assert [d for d, w in got.items() if w.eval] == [4, 8, 12]
    assert [d for d, w in got.items() if w.save] == [6, 12]
    assert not any(training.due(tcfg, d).save for d in range(1, 13))  # no checkpoints: never saves


def test_a_log_record_holds_the_step_floats_per_layer_scalars_and_the_rates_in_order():
    values = {"loss": np.float32(2.5), "grad_norm_layer": np.asarray([1.0, 2.0])}
    record = training.log_record(7, values, 1000.0, 0.25)
    assert record == {"step": 7, "loss": 2.5, "grad_norm/0": 1.0, "grad_norm/1": 2.0, "tokens_per_s": 1000.0,
                      "mfu": 0.25}
    assert list(record)[0] == "step" and list(record)[-2:] == ["tokens_per_s", "mfu"]
    assert all(type(v) is float for k, v in record.items() if k != "step")


def test_the_validation_loss_is_token_weighted_and_nan_stays_nan():
    sums = [{"loss_sum": np.float32(10.0), "tokens": np.float32(4.0)},
            {"loss_sum": np.float32(2.0), "tokens": np.float32(4.0)}]
    assert float(training.mean_loss(sums)) == pytest.approx(1.5)
    uneven = [{"loss_sum": np.float32(9.0), "tokens": np.float32(3.0)},
              {"loss_sum": np.float32(1.0), "tokens": np.float32(1.0)}]
    assert float(training.mean_loss(uneven)) == pytest.approx(2.5)  # 10 / 4, not (3 + 1) / 2
    assert training.val_record(1.5) == {"val_loss": 1.5, "val_ppl": pytest.approx(math.exp(1.5))}
    nan = training.val_record(math.nan)
    assert math.isnan(nan["val_loss"]) and math.isnan(nan["val_ppl"])


def test_the_clock_skips_the_first_step_and_paused_time_and_counts_every_member(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(meter.time, "perf_counter", lambda: now[0])
    clock = meter.Throughput(tokens_per_step=64, flops_per_token=10.0, peak=1000.0, devices=2, members=3)
    assert not clock.started
    clock.step({})  # the first (compiling) step only starts the clock
    assert clock.started and clock.tokens == 0
    for _ in range(4):
        now[0] += 1.0
        clock.step({})
    with clock.paused():
        now[0] += 50.0  # a checkpoint save: not counted
    rate, mfu = clock.rates()
    assert rate == pytest.approx(4 * 64 / 4.0)
    assert mfu == pytest.approx(rate * 3 * 10.0 / (1000.0 * 2))
    clock.restart()
    assert clock.rates() == (None, None)  # nothing counted since the restart


def test_a_clock_without_a_known_peak_reports_tokens_but_no_mfu(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(meter.time, "perf_counter", lambda: now[0])
    clock = meter.Throughput(tokens_per_step=8, flops_per_token=1.0, peak=None, devices=1)
    clock.step({})
    now[0] += 2.0
    clock.step({})
    assert clock.rates() == (4.0, None)


def test_a_runs_clock_reads_its_tokens_flops_and_configured_peak_from_the_config():
    from lecture3 import accounting
    from lecture3.config import Config

    cfg = Config().replace(**{"train.peak_tflops": 2.0, "train.batch_size": 4})
    clock = meter.Throughput.for_run(cfg, devices=2, members=3)
    assert clock.tokens_per_step == 4 * cfg.data.seq_len and clock.peak == 2e12
    assert clock.flops_per_token == accounting.flops_per_token(cfg.model, cfg.data.seq_len)["training"]
    assert (clock.devices, clock.members) == (2, 3)


def test_a_runs_clock_says_once_why_there_is_no_mfu_and_nothing_when_the_peak_is_known(monkeypatch):
    from lecture3 import training
    from lecture3.config import Config

    said = []
    monkeypatch.setattr(meter, "peak_flops_per_device", lambda *a, **k: None)
    assert training.clock(Config(), devices=1, echo=said.append).peak is None
    assert len(said) == 1 and said[0].startswith("note: no MFU") and "--train.peak-tflops N" in said[0]
    monkeypatch.setattr(meter, "peak_flops_per_device", lambda *a, **k: 5e12)
    assert training.clock(Config(), devices=1, echo=said.append).peak == 5e12 and len(said) == 1
