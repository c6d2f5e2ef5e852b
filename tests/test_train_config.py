"""TrainConfig, MeshConfig, DistConfig and Config reject bad values with the field and what is allowed."""

import pytest

from lecture3.config import Config, DistConfig, MeshConfig, ModelConfig, TrainConfig
from lecture3.data import DataConfig

BAD = [
    (TrainConfig, {"steps": 0}, r"TrainConfig.steps=0 is invalid: expected a positive integer"),
    (TrainConfig, {"batch_size": -4}, r"TrainConfig.batch_size=-4 .* positive integer"),
    (TrainConfig, {"warmup_steps": -1}, r"TrainConfig.warmup_steps=-1 .* integer >= 0"),
    (TrainConfig, {"lr": 0.0}, r"TrainConfig.lr=0.0 .* positive number"),
    (TrainConfig, {"final_lr": 1.0, "lr": 0.1}, r"TrainConfig.final_lr=1.0 .* \[0, lr=0.1\]"),
    (TrainConfig, {"schedule": "linear"}, r"TrainConfig.schedule='linear' .*'cosine', 'wsd'"),
    (TrainConfig, {"on_nonfinite": "ignore"}, r"TrainConfig.on_nonfinite='ignore' .*'stop', 'skip'"),
    (TrainConfig, {"beta2": 1.0}, r"TrainConfig.beta2=1.0 .* \[0, 1\)"),
    (TrainConfig, {"weight_decay": 0.0}, r"TrainConfig.weight_decay=0.0 .* or None \(off\)"),
    (TrainConfig, {"z_loss": -1e-4}, r"TrainConfig.z_loss=-0.0001 .* or None \(off\)"),
    (TrainConfig, {"decay_fraction": 0.0}, r"TrainConfig.decay_fraction=0.0 .* \(0, 1\]"),
    (MeshConfig, {"fsdp": 0}, r"MeshConfig.fsdp=0 .* positive integer or -1"),
    (MeshConfig, {"data": -1, "tensor": -1}, r"at most one axis set to -1"),
    (DistConfig, {"coordinator_address": "h:1"}, r"all set together"),
    (DistConfig, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"process_id=2 .* \[0, 2\)"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD, ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _ in BAD])
def test_bad_values_are_rejected_with_their_field(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_config_checks_sequence_length_against_a_position_table():
    with pytest.raises(ValueError, match=r"seq_len=128 .*model.max_seq_len=64 with position='learned'"):
        Config(model=ModelConfig(position="learned", max_seq_len=64), data=DataConfig(seq_len=128))
    Config(model=ModelConfig(position="rope", max_seq_len=64), data=DataConfig(seq_len=128))  # RoPE has no table


def test_defaults_are_valid_and_round_trip_through_a_dict():
    cfg = Config()
    assert cfg.to_dict()["model"]["d_model"] == 128 and cfg.train.weight_decay == 0.1
