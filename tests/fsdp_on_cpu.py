"""`python -m univigu ...` with accelerate's FSDP on CPU processes (gloo), so CI (no GPU) runs the FSDP path.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file FSDP.yaml tests/fsdp_on_cpu.py train STAGE.yaml ...

or `launch(...)` below from a test. accelerate enables FSDP only beside an accelerator and falls back to plain
multi-CPU data parallel; torch's FSDP2 itself runs on CPU. Run as a script, this turns the fallback back into
FSDP, as accelerate would on GPUs.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

CONFIGS = Path(__file__).parents[1] / "configs" / "accelerate"


def launch(args: list[str], workdir: Path, config: str = "fsdp_1gpu", processes: int = 2, **accelerate: object) -> None:
    """`univigu ARGS` under a shipped FSDP config (`configs/accelerate/CONFIG.yaml`) on `processes` CPU processes
    in all; `accelerate` overrides config keys (e.g. mixed_precision="no"). A several-machine config runs as that
    many launchers on this machine (one per machine rank). Asserts that every launcher succeeded."""
    cfg = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.update(num_processes=processes, main_process_port=port, **accelerate)
    if cfg["num_machines"] > 1:
        cfg["main_process_ip"] = "127.0.0.1"
    path = workdir / f"accelerate_{config}_{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launchers = [
        subprocess.Popen(["accelerate", "launch", "--config_file", str(path), "--machine_rank", str(rank), __file__,
                          *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for rank in range(cfg["num_machines"])
    ]
    for rank, launcher in enumerate(launchers):
        _, err = launcher.communicate(timeout=600)
        assert launcher.returncode == 0, f"machine {rank}: {err[-3000:]}"


def _fsdp_on_cpu() -> None:
    import torch
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    init = AcceleratorState.__init__

    def init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["device"] = self.device = torch.device("cpu")  # FSDP wants no index on CPU
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init_fsdp_on_cpu


if __name__ == "__main__":
    _fsdp_on_cpu()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's univigu, as the tests import
    from univigu.cli import app

    app(prog_name="univigu")
