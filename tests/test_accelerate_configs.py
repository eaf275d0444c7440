"""The launch configs in configs/accelerate/ parse the way `accelerate launch` parses them, and es2's launcher builds
commands that use them. No GPU and no process is started: accelerate's own config class and argument validation
run on the files, so a misspelt key (top level or inside fsdp_config/deepspeed_config) fails here, not on a cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_multi_gpu_env

from es2.errors import ConfigError
from es2.launch import launch_command

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"

# file -> (distributed_type, num_processes in the file)
EXPECTED = {
    "single_gpu.yaml": (DistributedType.NO, 1),
    "ddp.yaml": (DistributedType.MULTI_GPU, 8),
    "fsdp.yaml": (DistributedType.FSDP, 8),
    "zero2.yaml": (DistributedType.DEEPSPEED, 8),
    "zero3.yaml": (DistributedType.DEEPSPEED, 8),
    "multinode_fsdp.yaml": (DistributedType.FSDP, 16),
}
ACCELERATE_LAUNCH = ["-m", "accelerate.commands.launch"]


def _launch_args(cfg_path: Path, num_processes: int):
    """The accelerate launch arguments es2 builds for this file, parsed and merged with the file by accelerate."""
    cfg = SimpleNamespace(num_processes=num_processes, accelerate_config=str(cfg_path))
    cmd, _ = launch_command(cfg, ["train"], cuda=True)
    start = cmd.index(ACCELERATE_LAUNCH[1]) + 1
    args = launch_command_parser().parse_args(cmd[start:])
    args, _, _ = _validate_launch_command(args)
    return args


def _unknown_nested_keys(raw: dict) -> list[str]:
    """Nested keys become `accelerate launch` options (fsdp_config.x -> --fsdp_x, deepspeed_config.x -> --x);
    accelerate ignores any other key without a word, so check them against the launch parser's options."""
    options = {action.dest for action in launch_command_parser()._actions}
    nested = [key if key.startswith("fsdp") else f"fsdp_{key}" for key in raw.get("fsdp_config") or {}]
    nested += list(raw.get("deepspeed_config") or {})
    return [key for key in nested if key not in options]


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_in_accelerate_with_known_keys(name):
    path = CONFIG_DIR / name
    text = path.read_text()
    assert text.startswith("#") and "es2 train --set train.accelerate_config=configs/accelerate/" in text
    raw = yaml.safe_load(text)
    config = ClusterConfig.from_yaml_file(str(path))  # raises on an unknown top-level key
    distributed_type, num_processes = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes
    assert config.mixed_precision == "bf16"
    assert config.use_cpu is False
    assert _unknown_nested_keys(raw) == []


def test_fsdp_files_use_fsdp2_with_a_full_state_dict():
    for name in ("fsdp.yaml", "multinode_fsdp.yaml"):
        fsdp = ClusterConfig.from_yaml_file(str(CONFIG_DIR / name)).fsdp_config
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        # Trainer.save_model writes the adapter under FSDP only with FULL_STATE_DICT
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
        # the Trainer's activation checkpointing (train.gradient_checkpointing) and FSDP's cannot both be on
        assert fsdp["fsdp_activation_checkpointing"] is False


def test_deepspeed_files():
    zero2 = ClusterConfig.from_yaml_file(str(CONFIG_DIR / "zero2.yaml")).deepspeed_config
    zero3 = ClusterConfig.from_yaml_file(str(CONFIG_DIR / "zero3.yaml")).deepspeed_config
    assert zero2["zero_stage"] == 2 and zero3["zero_stage"] == 3
    assert zero3["zero3_init_flag"] is True
    assert zero3["zero3_save_16bit_model"] is True  # needed for save_model to write the adapter under ZeRO-3
    for ds in (zero2, zero3):
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        # left to the Trainer ("auto"), so es2's TrainingArguments decide
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds


def test_multinode_file():
    config = ClusterConfig.from_yaml_file(str(CONFIG_DIR / "multinode_fsdp.yaml"))
    assert config.num_machines == 2 and config.machine_rank == 0
    assert config.main_process_ip and config.main_process_port
    assert config.num_processes % config.num_machines == 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_es2_gpu_launch_command_uses_the_config_file(name):
    path = CONFIG_DIR / name
    cfg = SimpleNamespace(num_processes=2, accelerate_config=str(path))
    cmd, env = launch_command(cfg, ["train", "--set", "train.num_processes=2"], cuda=True)
    assert cmd[1:3] == ACCELERATE_LAUNCH
    assert cmd[cmd.index("--config_file") + 1] == str(path)
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-5:] == ["-m", "es2.cli", "train", "--set", "train.num_processes=2"]
    assert env.get("ACCELERATE_USE_CPU") == os.environ.get("ACCELERATE_USE_CPU")  # GPU runs add no CPU switch
    # accelerate accepts es2's argv and merges the file: the command line's process count wins over the file's
    args = _launch_args(path, 2)
    assert args.num_processes == 2
    assert args.mixed_precision == "bf16"
    distributed_type = EXPECTED[name][0]
    assert args.use_fsdp == (distributed_type == DistributedType.FSDP)
    assert args.use_deepspeed == (distributed_type == DistributedType.DEEPSPEED)
    assert args.multi_gpu == (distributed_type == DistributedType.MULTI_GPU)


def test_fsdp_launch_environment():
    env = prepare_multi_gpu_env(_launch_args(CONFIG_DIR / "fsdp.yaml", 2))
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_es2_cpu_launch_command_is_torchrun_with_accelerate_use_cpu():
    cfg = SimpleNamespace(num_processes=2, accelerate_config=None)
    cmd, env = launch_command(cfg, ["train"], cuda=False)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert "--config_file" not in cmd
    assert cmd[-3:] == ["-m", "es2.cli", "train"]
    assert env["ACCELERATE_USE_CPU"] == "1"


def _cpu_launch(name: str):
    cfg = SimpleNamespace(num_processes=2, accelerate_config=str(CONFIG_DIR / name))
    return launch_command(cfg, ["train"], cuda=False)


def test_es2_cpu_launch_honours_the_fsdp_file_in_fp32():
    cmd, env = _cpu_launch("fsdp.yaml")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--config_file" not in cmd
    # the workers complete accelerate's FSDP state before es2.cli runs (tests/test_fsdp_launch.py trains this way)
    assert cmd[-3:] == ["-m", "es2.launch", "train"]
    assert env["ACCELERATE_USE_CPU"] == "1" and env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the file's bf16 is for GPUs


@pytest.mark.parametrize("name", ["ddp.yaml", "single_gpu.yaml"])
def test_es2_cpu_launch_of_an_unsharded_file_is_plain_multi_cpu(name):
    cmd, env = _cpu_launch(name)
    assert cmd[-3:] == ["-m", "es2.cli", "train"]
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert "ACCELERATE_USE_FSDP" not in env and not any(key.startswith("FSDP_") for key in env)


@pytest.mark.parametrize(("name", "problem"), [("zero2.yaml", "DeepSpeed, which needs CUDA GPUs"),
                                               ("zero3.yaml", "DeepSpeed, which needs CUDA GPUs"),
                                               ("multinode_fsdp.yaml", "spans 2 machines")])
def test_es2_cpu_launch_refuses_what_it_cannot_run(name, problem):
    with pytest.raises(ConfigError, match=problem) as refused:
        _cpu_launch(name)
    assert refused.value.hint


@pytest.mark.parametrize("cuda", [False, True])
def test_a_missing_config_file_is_refused_before_any_launch(cuda):
    cfg = SimpleNamespace(num_processes=2, accelerate_config="configs/accelerate/fdsp.yaml")
    with pytest.raises(ConfigError, match="fdsp.yaml is not a file"):
        launch_command(cfg, ["train"], cuda=cuda)


def test_a_misspelt_key_is_caught(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIG_DIR / "fsdp.yaml").read_text().replace("mixed_precision:", "mixed_precison:"))
    with pytest.raises(ValueError, match="unknown keys"):
        ClusterConfig.from_yaml_file(str(bad))
    raw = yaml.safe_load((CONFIG_DIR / "zero3.yaml").read_text())
    raw["deepspeed_config"]["zero3_init"] = raw["deepspeed_config"].pop("zero3_init_flag")
    raw["fsdp_config"] = {"state_dict_typ": "FULL_STATE_DICT"}
    assert _unknown_nested_keys(raw) == ["fsdp_state_dict_typ", "zero3_init"]
