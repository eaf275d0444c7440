"""Multi-process launch for `es2 train`: re-runs the same command under accelerate (GPUs) or torchrun (CPU).

On CPU, `accelerate launch --cpu --num_processes N` silently starts ONE process (it needs mpirun), so CPU runs go
through torchrun with ACCELERATE_USE_CPU=1, which gives accelerate's MULTI_CPU mode on gloo. GPU runs go through
`accelerate launch --config_file configs/accelerate/<name>.yaml` (DDP, FSDP, DeepSpeed ZeRO-2/3).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def needs_launcher(cfg) -> bool:
    """True when more than one process is asked for and this process is not already one of them."""
    return (cfg.num_processes > 1 or cfg.accelerate_config is not None) and "LOCAL_RANK" not in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(cfg, cli_args: list[str], cuda: bool) -> tuple[list[str], dict]:
    env = {**os.environ}
    port = str(_free_port())
    if cuda:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if cfg.accelerate_config:  # the file decides processes, port and machines unless params say otherwise
            cmd += ["--config_file", cfg.accelerate_config]
        if cfg.num_processes > 1 or not cfg.accelerate_config:
            cmd += ["--num_processes", str(cfg.num_processes)]
        if not cfg.accelerate_config:
            cmd += ["--main_process_port", port]
    else:
        # one thread per rank: two ranks on two cores must not oversubscribe (OpenMP spin-waits)
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), ES2_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.num_processes),
               "--master_addr", "127.0.0.1", "--master_port", port]
    return cmd + ["-m", "es2.cli", *cli_args], env


def relaunch(cfg, cli_args: list[str]) -> int:
    import torch

    cmd, env = launch_command(cfg, cli_args, torch.cuda.is_available())
    print(f"launching {cfg.num_processes} processes: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, env=env).returncode
