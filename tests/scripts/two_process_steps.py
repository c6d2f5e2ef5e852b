"""Run 3 train steps as one process of a multi-process job (or alone, as the reference).

usage: two_process_steps.py OUT.json CORPUS_ROOT [PROCESS_ID COORDINATOR]
With a process id, 2 processes x 4 CPU devices form one 8-device mesh through jax.distributed, each
reading only its own data shard; alone, 8 local devices read both shards and concatenate them, which is
the same global batch.
"""

import json
import os
import sys

multi = len(sys.argv) > 3
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 if multi else 8}"
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_helpers import tiny_config  # noqa: E402

from lecture3 import data as dataio  # noqa: E402
from lecture3 import sharding, steps  # noqa: E402
from lecture3.config import DistConfig, MeshConfig  # noqa: E402
from lecture3.loop import init_distributed  # noqa: E402

out, root = sys.argv[1], Path(sys.argv[2])
cfg = tiny_config(root)
cfg = dataclasses.replace(cfg, mesh=MeshConfig(2, 4, 1))
if multi:
    cfg = dataclasses.replace(cfg, dist=DistConfig(sys.argv[4], 2, int(sys.argv[3])))
init_distributed(cfg)
jax.config.update("jax_default_matmul_precision", "highest")
pi, pc = jax.process_index(), jax.process_count()
mesh = sharding.make_mesh(cfg.mesh)
rules = sharding.axis_rules(cfg.model, mesh, cfg.train.batch_size)
_, shardings = steps.state_shardings(cfg.model, cfg.train, mesh, rules)
state = steps.init_state(cfg.model, cfg.train, mesh, rules)
step = steps.jit_train_step(steps.make_train_step(cfg.model, cfg.train), mesh, rules, shardings)
if multi:
    iterators = [dataio.make_train_iterator(cfg.data, cfg.train.batch_size, process_index=pi, process_count=pc)]
else:
    iterators = [dataio.make_train_iterator(cfg.data, cfg.train.batch_size, process_index=i, process_count=2)
                 for i in range(2)]
losses = []
for _ in range(3):
    local = [next(it) for it in iterators]
    local = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
    state, m = step(state, dataio.global_batch(local, sharding.batch_sharding(mesh, rules)))
    losses.append(float(m["loss"]))
if pi == 0:
    Path(out).write_text(json.dumps({"losses": losses, "devices": jax.device_count(), "processes": pc}))
