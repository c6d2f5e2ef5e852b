"""A short run's losses, pinned as commit 2d1ee22 computed them (the commit the protocol v2 suite runs
from): refactors, new options and speed-ups must leave the default path's numbers alone, so records of
that suite stay comparable with runs of later code. Measured on 8 simulated CPU devices at the tests'
matmul precision, on a corpus this test writes (no dependence on the Python's standard library)."""

import random

import lecture3
from lecture3.config import Config, MeshConfig, ModelConfig, TrainConfig
from lecture3.data import DataConfig

PINNED_LOSSES = [5.498589515686035, 5.350512981414795, 5.178681373596191, 4.995147705078125, 4.8786115646362305,
                 4.834303855895996]
PINNED_VAL = 4.796530246734619
WORDS = ["def", "return", "self", "x", "=", "(", ")", ":", "\n", "    ", "import", "for", "in", "if", "else"]


def test_a_short_run_computes_the_pinned_losses(tmp_path):
    rng = random.Random(0)
    for i in range(40):
        (tmp_path / f"f{i:02d}.py").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400))))
    cfg = Config(model=ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
                 data=DataConfig(source=f"files:{tmp_path}/*.py", tokenizer="bytes", seq_len=32, val_sequences=16,
                                 val_fraction=0.2, data_dir=str(tmp_path / "cache")),
                 train=TrainConfig(steps=6, batch_size=8, warmup_steps=2, log_every=1, eval_every=6,
                                   eval_batches=2, lr=3e-3, progress=False, sample_tokens=0, z_loss=1e-4),
                 mesh=MeshConfig(data=-1))
    run = lecture3.train(cfg, echo=lambda *a, **k: None)
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert len(losses) == len(PINNED_LOSSES)
    assert max(abs(a - b) for a, b in zip(losses, PINNED_LOSSES, strict=True)) <= 1e-6, losses
    assert abs(run.metrics["val_loss"] - PINNED_VAL) <= 1e-6, run.metrics["val_loss"]
