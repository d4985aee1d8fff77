"""A task-agnostic trainer on `accelerate`: one code path from a CPU test to FSDP on GPUs.

The task contract
-----------------
A task is an `nn.Module` whose forward is `task(batch, generator=g) -> dict`:

- `batch` is what `collate_fn` made of this process's micro-batch, moved to the device;
- `generator` is a `torch.Generator` on the device, seeded per process and checkpointed: draw
  *all* training noise from it (`torch.randn(..., generator=generator)`), never from the
  global RNG, so that a resumed run draws the same noise as an uninterrupted one (the global
  RNGs are checkpointed too, which covers dropout, but the generator keeps the task's
  randomness explicit and independent of library internals);
- a task whose forward also takes `sample_seeds` gets one int seed per sample of the micro-batch
  (a list), a function of the sample's global position in the run: drawing each sample's noise
  from its own seed makes the run independent of the number of processes (2 processes with
  batch 4 compute what 1 process with batch 8 computes) and resumes exactly;
- the dict holds `"loss"` (a scalar tensor to minimise) and any other scalar logs (tensors or
  floats, the same keys on every call and process); logs are averaged over micro-batches and
  processes. A log given as a pair `(sum, count)` (a term only some samples carry) is logged as
  its total sum over its total count across micro-batches, processes and the steps of a log row
  (NaN in a row where no sample carried it).

Trainable parameters are those with `requires_grad=True` when the Trainer is built.

Checkpoint layout (`output_dir/checkpoints/`)
---------------------------------------------
    latest                      text file: name of the newest complete checkpoint
    step_000100/
        model.safetensors, optimizer.bin, random_states_<rank>.pkl, ...   accelerator.save_state
                                (FSDP: pytorch_model_fsdp_0/, optimizer_0/, one shard per process)
        generator_<rank>.pt     the task generator of each process
        ema.pt                  {param name: fp32 tensor}, trainable params (ema_<rank>.pt under FSDP)
        trainer_state.json      step, data position, bad-step counters, elapsed time
        config.json             TrainerConfig + num_processes (+ the caller's `run_config`), checked on resume

A checkpoint is written to `.tmp_step_XXXXXX`, fsynced, renamed, and only then named by
`latest`: a kill at any point leaves the previous checkpoint usable (see `checkpoint.py`). Resuming
checks a checkpoint before loading it: a damaged latest one (a missing or truncated file) is passed
over for the one before it, with a warning; weights of another shape than the model's are a ResumeError.
`output_dir` must be on a filesystem all processes share.

Policies
--------
- Data: the dataset must be deterministic in the index; see `ResumableBatchSampler`.
- Non-finite loss (any micro-batch, any process) or gradient norm: the step is skipped on all
  processes (grads zeroed, no optimizer/EMA update) but still consumes its batch and its LR
  slot; more than `max_bad_steps` skipped steps *in a row* abort (isolated spikes are survived,
  a diverged run stops fast).
- Logs (`losses.csv`, TensorBoard `tb/`, tqdm) average the good steps since the last log row;
  keep `save_every` a multiple of `log_every` for resumed logs identical to uninterrupted ones.
- Launch: `python script.py` (one process) or `accelerate launch [--multi_gpu | FSDP config]
  script.py`; several CPU processes (gloo): `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
  --num_processes N script.py` (accelerate's own `--cpu` multi-process launcher needs MPI).
  FSDP: the configs in `configs/accelerate/` (FSDP2); the tests run them on CPU processes through
  `tests/fsdp_on_cpu.py`, since accelerate turns FSDP on only beside an accelerator.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs, DistributedType, parse_flag_from_env, send_to_device, set_seed,
)  # fmt: skip
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from univigu.checks import check_finite, check_int, check_positive
from univigu.training import checkpoint as ckpt
from univigu.training.ema import EMA
from univigu.training.sampler import ResumableBatchSampler

# Config keys that may differ on resume: they do not change what the run computes.
_FREE_KEYS = {"output_dir", "max_steps", "save_every", "keep_last", "log_every", "max_bad_steps",
              "num_workers", "gradient_checkpointing", "find_unused_parameters", "compile",
              "activation_memory_budget"}  # fmt: skip


def _flatten(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """{"a": {"b": 1}, "c": {}} -> {prefix + "a.b": 1}: nested settings compared and reported key by key (a key
    set on one side only reads None on the other)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class ResumeError(ValueError):
    """A checkpoint this run cannot continue: its config differs in what changes the training math.
    `continue_with`: overrides (`train.key=value`) that would continue it, where some would."""

    def __init__(self, message: str, continue_with: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.continue_with = continue_with


@dataclass
class TrainerConfig:
    output_dir: str = "runs/train"
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1  # global batch = batch_size * num_processes * grad_accum
    lr: float = 1e-4
    weight_decay: float = 0.0  # applied to >=2-D parameters only
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warmup, then cosine down to lr * min_lr_ratio at max_steps
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    ema_decay: float | None = None  # None: no EMA
    ema_start: int = 0  # before this step the EMA just copies the weights
    # "no" | "bf16" | "fp16" | "auto" (bf16 where the device computes it natively, else "no": see native_bf16);
    # false is "no" (YAML reads a bare `no` as false)
    mixed_precision: str | bool = "no"
    # False | True (recompute every block in backward) | "keep_attention" (recompute all but the attention kernels:
    # faster at long sequences for a little memory; see univigu.models.transformer.keep_attention_checkpointing)
    gradient_checkpointing: bool | str = False
    # torch.compile each repeated block (diffusers' compile_repeated_blocks); with it, activation_memory_budget (0-1)
    # lets the compiled backward recompute cheap operations instead of keeping them (a process-wide torch setting)
    compile: bool = False
    activation_memory_budget: float | None = None
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    max_bad_steps: int = 10  # consecutive non-finite steps tolerated; one more aborts
    num_workers: int = 0
    find_unused_parameters: bool = False  # DDP: set when some steps leave trainable params unused

    def __post_init__(self) -> None:
        # by type first, stored as Python numbers: a float batch size or a string lr would otherwise fail (or
        # save a numpy int to JSON) deep inside the run
        for name, minimum in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("save_every", 1),
                              ("keep_last", 1), ("log_every", 1), ("warmup_steps", 0), ("ema_start", 0),
                              ("seed", 0), ("max_bad_steps", 0), ("num_workers", 0)):  # fmt: skip
            setattr(self, name, check_int(name, getattr(self, name), minimum))
        for name in ("lr", "weight_decay", "min_lr_ratio"):
            setattr(self, name, check_finite(name, getattr(self, name)))
        for name in ("max_grad_norm", "ema_decay", "activation_memory_budget"):  # None: off
            if getattr(self, name) is not None:
                setattr(self, name, check_finite(name, getattr(self, name)))
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TypeError(f"betas must be 2 numbers, got {self.betas!r}")
        self.betas = tuple(check_finite("betas", beta) for beta in self.betas)  # YAML gives lists
        # in range: each of these otherwise trains to exit 0 and a wrong model (a negative clip norm climbs the loss,
        # a zero one zeroes every gradient, an ema_decay >= 1 leaves the exported EMA weights garbage), or fails in
        # torch only once the model is built (betas)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 (gradients are clipped to that norm) or null for no clipping, "
                             f"got {self.max_grad_norm}")  # fmt: skip
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (the share of the average kept each step, e.g. 0.999) or "
                             f"null for no EMA, got {self.ema_decay}")  # fmt: skip
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (the final learning rate as a fraction of lr), "
                             f"got {self.min_lr_ratio}")  # fmt: skip
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must each be in [0, 1) (AdamW's moment decays, e.g. [0.9, 0.999]), "
                             f"got {list(self.betas)}")  # fmt: skip
        if self.gradient_checkpointing not in (False, True, "keep_attention"):
            raise ValueError("gradient_checkpointing must be false, true or 'keep_attention', "
                             f"not {self.gradient_checkpointing!r}")  # fmt: skip
        if self.activation_memory_budget is not None and not (self.compile and 0 < self.activation_memory_budget <= 1):
            raise ValueError("activation_memory_budget needs compile: true and a value in (0, 1], "
                             f"got {self.activation_memory_budget!r}")  # fmt: skip
        if self.mixed_precision is False:  # YAML reads a bare `no` (also from `--train.mixed_precision=no`) as false
            self.mixed_precision = "no"
        if self.mixed_precision not in ("no", "bf16", "fp16", "auto"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16', 'fp16' or 'auto', not {self.mixed_precision!r}")
        check_positive("lr", self.lr)  # torch's "Invalid learning rate" would come only once the model is built

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step `step` (0-based): a pure function, so no state."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        min_lr = self.lr * self.min_lr_ratio
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - min_lr)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively, so that bf16 autocast speeds training up: a CUDA device
    with bf16, or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 autocast is slower than float32 (on an AVX2-only
    CPU a toy recall step took 13x longer)."""
    if device.type == "cuda":  # not by emulation (a V100 "supports" bf16 so)
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":  # torch's own probes (private, hence read with a fallback)
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class Trainer:
    """Trains `task` (the contract in this module's docstring: `task(batch, generator=g) -> {"loss": ..., logs}`)
    on `dataset`, batched by `collate_fn`, as `config` says; `train()` runs to `config.max_steps`, resuming from
    `config.output_dir`'s latest checkpoint when asked. Under `accelerate launch` it is one process of many."""

    def __init__(self, task: nn.Module, dataset: Dataset, config: TrainerConfig,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 run_config: dict[str, Any] | None = None) -> None:  # fmt: skip
        """`run_config`: what else the run's losses depend on (a stage's data, mix, flow...), as JSON values;
        saved with each checkpoint, and a resume that changes it is a ResumeError, as for `config`."""
        # the device accelerate will pick, found without it (a PartialState made here broke CPU multi-process runs)
        on_gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
        native = native_bf16(torch.device("cuda" if on_gpu else "cpu"))
        self.auto_precision = config.mixed_precision == "auto"
        if self.auto_precision:  # the checkpoints record what was used: resuming elsewhere is checked
            config = replace(config, mixed_precision="bf16" if native else "no")
        self.config = cfg = config
        self.run_config = json.loads(json.dumps(run_config)) if run_config is not None else None
        self.dataset, self.collate_fn = dataset, collate_fn
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
        if AcceleratorState._shared_state:
            # one process may train several stages (train-all) in different precisions, but accelerate keeps the
            # first precision process-wide and refuses another: start its state afresh (the process group stays)
            AcceleratorState._reset_state()
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=[ddp]
        )
        if acc.num_processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # e.g. torchrun on a machine without GPUs: each process would train alone and they
            # would overwrite each other's checkpoints
            raise RuntimeError(
                "launched as several processes but accelerate sees one; on CPU set ACCELERATE_USE_CPU=1"
            )
        if cfg.mixed_precision == "bf16" and acc.device.type == "cpu" and not native and acc.is_main_process:
            warnings.warn("bf16 autocast on a CPU without native bf16 (AVX512-BF16 or AMX) is slow (13x slower "
                          "steps on an AVX2-only CPU); mixed_precision auto or no trains in float32",
                          stacklevel=2)  # fmt: skip
        if parse_flag_from_env("ACCELERATE_USE_FSDP") and not self.fsdp and acc.is_main_process:
            warnings.warn(f"launched with an FSDP config, but accelerate shards only across GPUs: this run "
                          f"({acc.distributed_type.value}, {acc.num_processes} process(es)) keeps whole weights on "
                          "each", stacklevel=2)  # fmt: skip
        if cfg.gradient_checkpointing:
            enabled = [
                m for m in task.modules()
                if callable(getattr(m, "enable_gradient_checkpointing", None))
                and getattr(m, "_supports_gradient_checkpointing", True)  # diffusers raises otherwise
            ]  # fmt: skip
            keep = None
            if cfg.gradient_checkpointing == "keep_attention":
                # imported here: the trainer takes any module and need not load diffusers for it
                from univigu.models.transformer import keep_attention_checkpointing as keep
            for m in enabled:
                m.enable_gradient_checkpointing(keep)
            if not enabled:
                warnings.warn("gradient_checkpointing=True, but no submodule has enable_gradient_checkpointing()")
        if cfg.compile:
            models = [m for m in task.modules() if getattr(m, "_repeated_blocks", None)]
            if not models:
                raise ValueError("compile: true, but no submodule lists _repeated_blocks to compile")
            # process-wide: set for every compiled run (1.0, torch's default: keep every activation), or a run after
            # one that lowered it in this process (train-all's next stage) would compile with the earlier budget
            budget = cfg.activation_memory_budget
            torch._functorch.config.activation_memory_budget = 1.0 if budget is None else budget
            for m in models:
                m.compile_repeated_blocks()  # regional compilation: one compiled block serves all of them

        named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the task has no trainable parameters")
        # nanoGPT's rule: decay matrices/embeddings; not biases, norm gains or other 1-D params
        groups = [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        # model and optimizer prepared together so accelerate can re-point the optimizer at
        # FSDP's sharded parameters; the DataLoader is not prepared: our sampler shards it.
        self.model, self.optimizer = acc.prepare(task, optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema: EMA | None = None
        if cfg.ema_decay is not None:
            unwrapped = acc.unwrap_model(self.model)
            self.ema = EMA([(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad])
        self.generator = torch.Generator(device=acc.device)
        self._wants_seeds = "sample_seeds" in inspect.signature(acc.unwrap_model(self.model).forward).parameters
        self.step = 0  # optimizer steps done
        self.micro_batches = 0  # global micro-batches consumed (the data position)
        self.bad_total = self.bad_streak = 0
        self.elapsed = 0.0

    # ------------------------------------------------------------------ public API

    def train(self, resume: bool | str | os.PathLike = False,
              on_start: Callable[[], None] | None = None) -> list[dict[str, float]]:  # fmt: skip
        """Train to `max_steps`; return the logged rows of this call.

        resume=False starts fresh (and refuses an output_dir that already has checkpoints);
        True resumes from the latest checkpoint if there is one; a path resumes from that one.
        `on_start` runs once the run is checked (resume point, config, weights) and before its first step: what
        the caller records of the run there is not written by a refused one.
        """
        cfg, acc = self.config, self.accelerator
        set_seed(cfg.seed, device_specific=True)  # per-process global RNGs (dropout)
        self.generator.manual_seed(_seed_of(cfg.seed, acc.process_index))
        path = self._resolve_resume(resume)
        if path is not None:
            self._load(path)
        if on_start is not None:
            on_start()
        self.model.train()
        data = iter(self._dataloader())
        csv_log = _CsvLog(self.output_dir / "losses.csv", self.step) if acc.is_main_process else None
        tb = self._tensorboard() if acc.is_main_process else None
        precision = {"no": "float32"}.get(cfg.mixed_precision, cfg.mixed_precision)  # "no": no autocast
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process,
                   dynamic_ncols=True, desc=f"train ({precision})")  # fmt: skip
        rows: list[dict[str, float]] = []
        window: dict[str, list[float]] = {}  # key -> [sum, weight] over the good steps since the last row
        keys = {"loss": None, "grad_norm": None}  # ordered set: CSV column order
        t0 = time.perf_counter() - self.elapsed
        while self.step < cfg.max_steps:
            stats, grad_norm, lr, skipped = self._train_step(data)
            self.step += 1
            self.elapsed = time.perf_counter() - t0
            keys.update(dict.fromkeys(stats))
            if not skipped:  # logs average the good steps of the window, a pair log over the samples carrying it
                for k, (total, weight) in {**stats, "grad_norm": (grad_norm, 1.0)}.items():
                    kept = window.setdefault(k, [0.0, 0.0])
                    kept[0], kept[1] = kept[0] + total, kept[1] + weight
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                # a term no sample of the window carried is NaN ("nan" in losses.csv), not 0
                means = {k: total / weight for k, (total, weight) in window.items() if weight > 0}
                row = {"step": self.step, **{k: means.get(k, math.nan) for k in keys},
                       "lr": lr, "bad_steps": self.bad_total, "time": self.elapsed}  # fmt: skip
                window = {}
                rows.append(row)
                if acc.is_main_process:
                    csv_log.write(row)
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(f"train/{k}", v, self.step)
                    bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", lr=f"{lr:.2e}")
            bar.update(1)
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        if tb is not None:
            tb.close()
        return rows

    @property
    def fsdp(self) -> bool:
        """Whether the model is sharded by FSDP (its weights whole only on gathering)."""
        return self.accelerator.distributed_type == DistributedType.FSDP

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """The task's whole state dict on CPU, the trainable weights at their EMA values when EMA is on,
        keyed like `task.state_dict()`. Collective under FSDP (call it on every process): the shards are
        gathered on the main process, and the others get an empty dict."""
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            full = self.accelerator.get_state_dict(self.model)  # gathers FSDP shards
            return {k: v.detach().cpu().clone() for k, v in full.items()}

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step_XXXXXX` atomically (all processes must call it)."""
        acc, cfg = self.accelerator, self.config
        name = ckpt.step_dir_name(self.step)
        tmp, final = self.ckpt_root / f".tmp_{name}", self.ckpt_root / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a save killed earlier
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # model, optimizer, grad scaler, per-process RNG states
        rank = acc.process_index
        torch.save(self.generator.get_state(), tmp / f"generator_{rank}.pt")
        if self.ema is not None and (self.fsdp or acc.is_main_process):
            torch.save(self.ema.state_dict(), tmp / (f"ema_{rank}.pt" if self.fsdp else "ema.pt"))
        if acc.is_main_process:
            epoch, index = self._sampler_position()
            state = {"step": self.step, "micro_batches": self.micro_batches, "epoch": epoch,
                     "index_in_epoch": index, "bad_total": self.bad_total,
                     "bad_streak": self.bad_streak, "elapsed": self.elapsed}  # fmt: skip
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            (tmp / "config.json").write_text(json.dumps(self._config_record(), indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.publish(tmp, final)
            ckpt.rotate(self.ckpt_root, cfg.keep_last)
        acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ internals

    def _train_step(self, data) -> tuple[dict[str, tuple[float, float]], float, float, bool]:
        """One optimizer step over grad_accum micro-batches: (logs as (sum, weight), grad norm, lr, skipped)."""
        cfg, acc = self.config, self.accelerator
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        bad = torch.zeros((), device=acc.device)
        for _ in range(cfg.grad_accum):
            batch = send_to_device(next(data), acc.device)
            extra = {"sample_seeds": self._sample_seeds()} if self._wants_seeds else {}
            self.micro_batches += 1
            with acc.accumulate(self.model):
                # accelerate autocasts the forward of a DDP model, but prepares FSDP2 without that wrapper: its
                # policy casts the weights to bf16, not the float32 tensors the task makes (noise, embeddings)
                with acc.autocast():
                    out = self.model(batch, generator=self.generator, **extra)
                loss = out["loss"]
                # backward even on NaN: under DDP every process must join the all-reduce
                acc.backward(loss)
            bad += (~torch.isfinite(loss.detach())).float()
            for k, v in out.items():
                total, count = v if isinstance(v, tuple) else (v, 1.0)
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(total, device=acc.device).detach().float().reshape(())
                counts[k] = counts.get(k, 0.0) + torch.as_tensor(count, device=acc.device).float().reshape(())
        assert acc.sync_gradients, "grad_accum micro-batches must end on a sync step"
        keys = sorted(sums)
        # one all-reduce for the logs and the NaN flag, so every process takes the same branch
        packed = acc.reduce(torch.stack([bad, *(sums[k] for k in keys), *(counts[k] for k in keys)]), reduction="sum")
        totals, weights = packed[1 : 1 + len(keys)], packed[1 + len(keys) :]
        stats = {k: (float(s), float(w)) for k, s, w in zip(keys, totals, weights)}
        grad_norm = float("nan")
        skip = bool(packed[0] > 0)
        if not skip:
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
            grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))  # FSDP2: over all shards (DTensors)
            # under fp16 an inf norm is the grad scaler's business (it skips and rescales)
            skip = not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16"
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_total += 1
            self.bad_streak += 1
            if acc.is_main_process:
                tqdm.write(f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                           f"({self.bad_streak} in a row, {self.bad_total} in total)")  # fmt: skip
            if self.bad_streak > cfg.max_bad_steps:
                raise RuntimeError(
                    f"aborting at step {self.step + 1}: {self.bad_streak} consecutive steps with a "
                    f"non-finite loss or gradient (max_bad_steps={cfg.max_bad_steps}); the last good "
                    f"checkpoint is {ckpt.find_latest(self.ckpt_root)}"
                )
            return stats, grad_norm, lr, True
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_streak = 0
        if self.ema is not None and not self.optimizer.step_was_skipped:
            self.ema.update(0.0 if self.step < cfg.ema_start else cfg.ema_decay)
        return stats, grad_norm, lr, False

    def _sample_seeds(self) -> list[int]:
        """Seeds of this process's samples in the current micro-batch, keyed by global position."""
        cfg, acc = self.config, self.accelerator
        first = (self.micro_batches * acc.num_processes + acc.process_index) * cfg.batch_size
        return [_seed_of(cfg.seed, position) for position in range(first, first + cfg.batch_size)]

    def _dataloader(self) -> DataLoader:
        cfg, acc = self.config, self.accelerator
        sampler = ResumableBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed, acc.process_index,
                                        acc.num_processes, start=self.micro_batches)  # fmt: skip
        self._sampler = sampler
        return DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn, num_workers=cfg.num_workers,
            pin_memory=acc.device.type == "cuda",
            # its own generator: creating the iterator must not consume the global RNG
            generator=torch.Generator().manual_seed(cfg.seed),
        )  # fmt: skip

    def _sampler_position(self) -> tuple[int, int]:
        return self._sampler.position(self.micro_batches)

    def _config_record(self) -> dict[str, Any]:
        record = {**asdict(self.config), "num_processes": self.accelerator.num_processes}
        return record if self.run_config is None else {**record, "run": self.run_config}

    def _resolve_resume(self, resume: bool | str | os.PathLike) -> Path | None:
        if resume is False:
            if ckpt.list_checkpoints(self.ckpt_root):
                raise FileExistsError(
                    f"{self.ckpt_root} already holds checkpoints: pass resume=True (--resume) to continue "
                    "that run, or use a fresh output_dir"
                )
            return None
        path = ckpt.find_latest(self.ckpt_root) if resume is True else Path(resume)
        if path is None:
            if self.accelerator.is_main_process:
                tqdm.write(f"no checkpoint in {self.ckpt_root}: starting from scratch")
            return None
        problem = ckpt.damage(path)
        if problem is None:
            return path
        previous = _previous_checkpoint(path)
        if resume is True and previous is not None:  # the steps after it are simply trained again
            if self.accelerator.is_main_process:  # once, not once per process
                warnings.warn(f"checkpoint {path} is damaged ({problem}): resuming from {previous}")
            return previous
        hint = f"resume from the one before it, {previous}" if previous is not None else "start in a new output_dir"
        raise ResumeError(f"cannot resume from {path}: the checkpoint is damaged or incomplete ({problem}); {hint}")

    def _layout(self) -> str:
        """How this run writes its checkpoints: "plain" (one model file), or FSDP's "sharded" or "full" state."""
        if not self.fsdp:
            return "plain"
        kind = str(self.accelerator.state.fsdp_plugin.state_dict_type).upper()
        return "sharded" if "SHARDED" in kind else "full"

    def _check_layout(self, path: Path) -> None:
        """The checkpoint was written as this run writes them (another launch config fails deep inside accelerate's
        loader, naming a missing file)."""
        saved, now = ckpt.layout(path), self._layout()
        names = {"plain": "without FSDP", "sharded": "by FSDP as shards (SHARDED_STATE_DICT)",
                 "full": "by FSDP as whole weights (FULL_STATE_DICT)"}  # fmt: skip
        if saved != now:
            raise ResumeError(f"cannot resume from {path}: it was saved {names[saved]}, and this run saves "
                              f"{names[now]}: launch it with the accelerate config it was trained with")

    def _check_weights(self, path: Path) -> None:
        """The checkpoint's weights have this model's names and shapes (a changed model or pipeline size would
        otherwise fail inside load_state_dict, listing every key)."""
        saved = ckpt.weight_shapes(path)
        if saved is None:  # FSDP shards: no header to read
            return
        now = self.accelerator.unwrap_model(self.model).state_dict()  # DDP's wrapper prefixes every name
        kept = {v.data_ptr() for k, v in now.items() if k in saved}  # tied weights are saved once
        changed = [f"{k}: checkpoint {list(saved[k])} -> now {list(v.shape)}"
                   for k, v in now.items() if k in saved and tuple(v.shape) != saved[k]]  # fmt: skip
        changed += [f"{k}: not in the checkpoint" for k, v in now.items() if k not in saved and v.data_ptr() not in kept]
        changed += [f"{k}: not in this model" for k in saved if k not in now]
        if changed:
            shown = "\n".join(f"  {line}" for line in changed[:8])
            more = f"\n  ... and {len(changed) - 8} more" if len(changed) > 8 else ""
            raise ResumeError(f"cannot resume from {path}: its model differs from this config's (model or pipeline "
                              f"sizes changed?) in {len(changed)} weights:\n{shown}{more}")  # fmt: skip

    def _load(self, path: Path) -> None:
        acc = self.accelerator
        saved = json.loads((path / "config.json").read_text())
        now = json.loads(json.dumps(self._config_record()))  # as saved: tuples read back as lists
        if "run" not in saved:  # a checkpoint from before run configs were recorded
            now.pop("run", None)
        saved, now = ({**{k: v for k, v in d.items() if k != "run"}, **_flatten(d.get("run", {}), "run.")}
                      for d in (saved, now))  # fmt: skip
        # a key absent on one side reads None (unset); a trainer key the checkpoint has and this version lacks is
        # no change, a run key is
        keys = sorted(set(now) | {k for k in saved if k.startswith("run.")})
        diff = {k: (saved.get(k), now.get(k)) for k in keys if k not in _FREE_KEYS and saved.get(k) != now.get(k)}
        if diff:
            lines = "\n".join(f"  {k}: checkpoint {a!r} -> now {b!r}" for k, (a, b) in diff.items())
            continue_with = ()
            if "mixed_precision" in diff:
                continue_with = (f"train.mixed_precision={diff['mixed_precision'][0]}",)
                auto = " (auto picks bf16 only where the device computes it natively)" if self.auto_precision else ""
                lines += f"\n  {continue_with[0]} continues in the checkpoint's precision{auto}"
            if any(k.startswith("run.cache_rows") for k in diff):
                lines += ("\n  the latent cache's videos changed since the run began (added or removed: the data "
                          "order differs); train on it in a new run (init_from= this run's final/ once it has one, "
                          "else what it began from), or on the cache as it was")  # fmt: skip
            raise ResumeError(f"cannot resume from {path}: the config changes the training math:\n{lines}",
                              continue_with)  # fmt: skip
        self._check_layout(path)
        self._check_weights(path)
        acc.load_state(str(path))
        self.generator.set_state(torch.load(path / f"generator_{acc.process_index}.pt"))
        if self.ema is not None:
            name = f"ema_{acc.process_index}.pt" if self.fsdp else "ema.pt"
            self.ema.load_state_dict(torch.load(path / name, map_location="cpu"))
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.micro_batches = state["step"], state["micro_batches"]
        self.bad_total, self.bad_streak = state["bad_total"], state["bad_streak"]
        self.elapsed = state["elapsed"]
        if acc.is_main_process:  # once, not once per process
            tqdm.write(f"resumed from {path} at step {self.step}")
            if self.step >= now["max_steps"]:
                tqdm.write(f"max_steps {now['max_steps']}: the run is at step {self.step} already, nothing to train "
                           "(raise max_steps to train further)")  # fmt: skip
            elif saved["max_steps"] != now["max_steps"]:
                warnings.warn(f"max_steps changed {saved['max_steps']} -> {now['max_steps']}: "
                              "the cosine schedule is stretched from here on")  # fmt: skip

    def _tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # purge_step hides events a killed run wrote past the checkpoint we resumed from
        return SummaryWriter(str(self.output_dir / "tb"), purge_step=self.step + 1 if self.step else None)


def _previous_checkpoint(path: Path) -> Path | None:
    """The newest undamaged checkpoint of an earlier step than `path`, beside it."""
    ckpts = ckpt.list_checkpoints(path.parent)  # in step order (names compare wrongly past step 999,999)
    earlier = ckpts[: ckpts.index(path)] if path in ckpts else []
    return next((p for p in reversed(earlier) if ckpt.damage(p) is None), None)


class _CsvLog:
    """`losses.csv`, one row per log step; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, resumed_step: int) -> None:
        self.path, self.fields = path, None
        if path.exists():
            with open(path, newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                keep = [r for r in reader if header and len(r) == len(header) and int(r[0]) <= resumed_step]
            if header and keep:
                self.fields = header
            tmp = path.with_suffix(".tmp")  # rewritten aside: a kill here must not lose the rows kept
            with open(tmp, "w", newline="") as fh:
                if self.fields:
                    csv.writer(fh).writerows([header, *keep])
            os.replace(tmp, path)

    def write(self, row: dict[str, float]) -> None:
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.fields)
        vals = [row.get(k, math.nan) for k in self.fields]
        line = ",".join(str(v) if isinstance(v, int) else repr(float(v)) for v in vals)
        with open(self.path, "a") as fh:  # one write per row: a kill leaves at worst a partial last line
            fh.write(line + "\n")
