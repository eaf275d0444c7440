"""Multi-process launch for `es2 train`: re-runs the same command under accelerate (GPUs) or torchrun (CPU).

On CPU, `accelerate launch --cpu --num_processes N` silently starts ONE process (it needs mpirun), so CPU runs go
through torchrun with ACCELERATE_USE_CPU=1, which gives accelerate's MULTI_CPU mode on gloo. GPU runs go through
`accelerate launch --config_file configs/accelerate/<name>.yaml` (DDP, FSDP, DeepSpeed ZeRO-2/3). On CPU an
accelerate config is honoured too: the workers get the environment `accelerate launch` would export for the file
(`cpu_config_env`), and an FSDP file really shards (FSDP2 on gloo, `complete_fsdp_on_cpu`).
"""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys

from es2.errors import ConfigError


def needs_launcher(cfg) -> bool:
    """True when more than one process is asked for and this process is not already one of them."""
    return (cfg.num_processes > 1 or cfg.accelerate_config is not None) and "LOCAL_RANK" not in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_config_env(path: str, num_processes: int, port: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file PATH` would export for its workers, for a CPU run.

    accelerate's own parser, file merge and environment builder read the file, so every FSDP field (and its
    defaults) reaches the workers exactly as on GPUs. Mixed precision is fp32 whatever the file says: the files'
    bf16 is for GPUs, and a CPU run stands in for the GPU run's arithmetic only at full precision.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", path, "--num_processes", str(num_processes),
                                               "--main_process_port", port, "-m", "es2.cli"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        raise ConfigError(f"{path} asks for DeepSpeed, which needs CUDA GPUs; this machine has none",
                          "on CPU drop train.accelerate_config (or use configs/accelerate/ddp.yaml or fsdp.yaml)")
    if args.num_machines > 1:
        raise ConfigError(f"{path} spans {args.num_machines} machines; es2's CPU launch starts processes on one",
                          "run `accelerate launch --config_file ...` on every node, as the file's comments say")
    env = prepare_multi_gpu_env(args) if args.use_fsdp else {}
    env = {key: value for key, value in env.items() if key == "ACCELERATE_USE_FSDP" or key.startswith("FSDP_")}
    return {**env, "ACCELERATE_MIXED_PRECISION": "no"}


def complete_fsdp_on_cpu() -> None:
    """Make accelerate's state FSDP on CPU workers, with the three assignments its GPU branch makes.

    accelerate 1.15 switches AcceleratorState to FSDP only when the process group runs on an accelerator
    (MULTI_GPU, MULTI_XPU, ...). On MULTI_CPU it drops the FSDP plugin it was given and the Trainer wraps the model
    in DDP, without a word, so an FSDP file would silently train unsharded. torch's FSDP2 runs on gloo, so after
    accelerate's own __init__ the state is completed here when it is MULTI_CPU with an FSDP plugin in hand; where
    accelerate already chose FSDP (or no plugin came) nothing changes.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_then_shard(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # accelerate's own last step: later AcceleratorState() calls copy the type from PartialState
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_then_shard


def launch_command(cfg, cli_args: list[str], cuda: bool) -> tuple[list[str], dict]:
    if cfg.accelerate_config and not os.path.isfile(cfg.accelerate_config):
        raise ConfigError(f"train.accelerate_config: {cfg.accelerate_config} is not a file",
                          "name one of configs/accelerate/*.yaml, relative to the folder es2 runs in")
    env = {**os.environ}
    port = str(_free_port())
    entry = "es2.cli"
    if cuda:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if cfg.accelerate_config:  # the file decides processes, port and machines unless params say otherwise
            cmd += ["--config_file", cfg.accelerate_config]
        if cfg.num_processes > 1 or not cfg.accelerate_config:
            cmd += ["--num_processes", str(cfg.num_processes)]
        if not cfg.accelerate_config:
            cmd += ["--main_process_port", port]
    else:
        if cfg.accelerate_config:
            env.update(cpu_config_env(cfg.accelerate_config, cfg.num_processes, port))
            if env.get("ACCELERATE_USE_FSDP") == "true":
                entry = "es2.launch"  # the workers complete accelerate's FSDP state, then run es2.cli
        # one thread per rank: two ranks on two cores must not oversubscribe (OpenMP spin-waits)
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), ES2_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.num_processes),
               "--master_addr", "127.0.0.1", "--master_port", port]
    return cmd + ["-m", entry, *cli_args], env


def relaunch(cfg, cli_args: list[str]) -> int:
    import torch

    cmd, env = launch_command(cfg, cli_args, torch.cuda.is_available())
    print(f"launching {cfg.num_processes} processes: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    # A CPU worker of an FSDP run. es2.cli is run by name, as `python -m es2.cli` would run it: the launcher sits
    # below the CLI in the import layers, and this is a process entry, not an import.
    complete_fsdp_on_cpu()
    runpy.run_module("es2.cli", run_name="__main__", alter_sys=True)
