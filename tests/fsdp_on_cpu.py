"""`python -m univigu ...` with accelerate's FSDP on CPU processes (gloo), so CI (no GPU) runs the FSDP path.

    accelerate launch --config_file FSDP.yaml tests/fsdp_on_cpu.py train STAGE.yaml ...   (ACCELERATE_USE_CPU=1)

accelerate enables FSDP only beside an accelerator and falls back to plain multi-CPU data parallel;
torch's FSDP2 itself runs on CPU. This turns the fallback back into FSDP, as accelerate would on GPUs.
"""

import torch
from accelerate.state import AcceleratorState, DistributedType, PartialState

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["device"] = self.device = torch.device("cpu")  # FSDP wants no index on CPU
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_fsdp_on_cpu

if __name__ == "__main__":
    from univigu.cli import app

    app(prog_name="univigu")
