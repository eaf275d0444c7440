"""The sharded path launched for real: `es2 train` with configs/accelerate/fsdp.yaml starts 2 gloo processes on CPU
(FSDP2, fp32) through the launcher users call, and trains the same adapter as one process with the whole batch,
as the DDP test in test_train.py shows for unsharded data parallelism."""

import json
import os
import subprocess

import pytest

from tests import test_train
from tests.conftest import REPO

workdir = test_train.workdir  # the same tiny random Llama and pairs as the DDP test
FSDP = REPO / "configs" / "accelerate" / "fsdp.yaml"


@pytest.mark.distributed
def test_fsdp_file_in_two_gloo_processes_equals_one_process(workdir):
    env = {**os.environ, "ES2_THREADS": "1"}
    steps = (*test_train.INVARIANCE, "train.save_steps=3")
    single, sharded = workdir / "fsdp_1", workdir / "fsdp_2"
    subprocess.run(test_train._cli(workdir, single, *steps, "train.batch_size=8"), check=True, env=env,
                   capture_output=True)
    done = subprocess.run(test_train._cli(workdir, sharded, *steps, "train.batch_size=4", "train.num_processes=2",
                                          f"train.accelerate_config={FSDP}"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching 2 processes" in done.stdout
    # accelerate's FSDP savers wrote the Trainer's checkpoint (a DDP run writes optimizer.pt and no model file):
    # the run was sharded, not silently data-parallel
    checkpoint = sharded / "checkpoints" / "checkpoint-3"
    assert sorted(p.name for p in checkpoint.glob("*fsdp*")) == ["pytorch_model_fsdp.bin"], done.stderr[-3000:]
    assert (checkpoint / "optimizer.bin").exists() and not (checkpoint / "optimizer.pt").exists()
    # Trainer.save_model gathered the full state dict, of which the adapter is kept: the same as one process
    assert test_train._max_diff(test_train._adapter(single), test_train._adapter(sharded)) < 1e-5
    assert [json.loads((d / "metrics.json").read_text())["world_size"] for d in (single, sharded)] == [1, 2]
