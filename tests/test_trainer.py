"""Trainer tests on a tiny MLP stand-in task (tests/trainer_stub.py): learning, logs, rotation,
exact resume after SIGKILL, a save killed midway, NaN skipping, and 2-process DDP on CPU."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from univigu.training import ResumeError, Trainer, TrainerConfig
from univigu.training import checkpoint as ckpt
from univigu.training.sampler import ResumableBatchSampler

sys.path.insert(0, str(Path(__file__).parent))
import trainer_stub  # noqa: E402
from threads import torch_threads  # noqa: E402
from trainer_stub import MLPTask, Regression, config  # noqa: E402

STUB = str(Path(__file__).parent / "trainer_stub.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def losses(path: Path) -> dict[int, float]:
    return {int(r["step"]): r["loss"] for r in read_csv(path)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stub(out: Path, *args: str) -> None:
    """The stub's command line run in this process (a process start costs seconds), on one thread as the
    subprocesses it is compared with."""
    with torch_threads(1):  # the stub sets it too
        trainer_stub.main([str(out), *args])


def test_sampler_shards_and_resumes() -> None:
    def take(s: ResumableBatchSampler, k: int) -> list[list[int]]:
        it = iter(s)
        return [next(it) for _ in range(k)]

    whole = take(ResumableBatchSampler(50, 8, seed=3), 20)  # 6 per epoch: crosses 3 epochs
    shards = [take(ResumableBatchSampler(50, 4, seed=3, rank=r, num_processes=2), 20) for r in (0, 1)]
    assert [a + b for a, b in zip(*shards)] == whole  # ranks split each global micro-batch
    assert take(ResumableBatchSampler(50, 8, seed=3, start=7), 13) == whole[7:]
    assert whole[:6] != whole[6:12]  # epochs are shuffled differently
    assert len(set(sum(whole[:6], []))) == 48  # an epoch has no repeats
    assert ResumableBatchSampler(50, 8, seed=3).position(13) == (2, 1)
    with pytest.raises(ValueError, match="smaller than one global micro-batch"):
        ResumableBatchSampler(7, 4, seed=0, num_processes=2)


def test_lr_schedule() -> None:
    c = TrainerConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert c.lr_at(0) == pytest.approx(0.2) and c.lr_at(3) == pytest.approx(0.8)
    assert c.lr_at(4) == pytest.approx(1.0) and c.lr_at(9) == pytest.approx(0.55)
    assert c.lr_at(14) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"batch_size": 2.5}, TypeError, "batch_size must be an int >= 1, got float 2.5"),  # was accepted
    ({"max_steps": True}, TypeError, "max_steps must be an int"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps must be an int >= 0, got -1"),
    ({"seed": "0"}, TypeError, "seed must be an int"),
    ({"lr": "1e-3"}, TypeError, "lr must be a finite number, got str"),  # was "'>' not supported ..."
    ({"lr": float("nan")}, ValueError, "lr must be a finite number"),
    ({"weight_decay": True}, TypeError, "weight_decay must be a finite number"),
    ({"min_lr_ratio": float("inf")}, ValueError, "min_lr_ratio must be a finite number"),
    ({"max_grad_norm": "1"}, TypeError, "max_grad_norm must be a finite number"),
    ({"ema_decay": float("nan")}, ValueError, "ema_decay must be a finite number"),
    ({"betas": (0.9, "0.999")}, TypeError, "betas must be a finite number"),
    ({"betas": 0.9}, TypeError, "betas must be 2 numbers"),
    ({"max_steps": 0}, ValueError, "max_steps must be an int >= 1, got 0"),  # the range checks stay
    ({"lr": 0}, ValueError, "lr must be > 0, got 0"),
    # in range: each of these trained to no error and a wrong model (or failed in torch once the model was built)
    ({"max_grad_norm": -1}, ValueError, r"max_grad_norm must be > 0 .* or null for no clipping, got -1.0"),
    ({"max_grad_norm": 0}, ValueError, r"max_grad_norm must be > 0 .*, got 0.0"),  # zeroed every gradient
    ({"ema_decay": 1.5}, ValueError, r"ema_decay must be in \[0, 1\) .* or null for no EMA, got 1.5"),
    ({"ema_decay": 1}, ValueError, r"ema_decay must be in \[0, 1\)"),  # a frozen average: the initial weights
    ({"ema_decay": -0.1}, ValueError, r"ema_decay must be in \[0, 1\)"),
    ({"min_lr_ratio": -0.1}, ValueError, r"min_lr_ratio must be in \[0, 1\] .*, got -0.1"),
    ({"min_lr_ratio": 2}, ValueError, r"min_lr_ratio must be in \[0, 1\]"),
    ({"weight_decay": -0.01}, ValueError, "weight_decay must be >= 0, got -0.01"),
    ({"betas": [1.5, 0.9]}, ValueError, r"betas must each be in \[0, 1\) .*, got \[1.5, 0.9\]"),
    ({"betas": (0.9, -0.1)}, ValueError, r"betas must each be in \[0, 1\)"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas must each be in \[0, 1\)"),
])  # fmt: skip
def test_config_numbers_are_checked_by_type(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        TrainerConfig(**kwargs)


def test_config_range_edges_are_accepted() -> None:
    TrainerConfig(max_grad_norm=None, ema_decay=None, min_lr_ratio=0, weight_decay=0, betas=(0, 0.999))
    TrainerConfig(ema_decay=0.0, min_lr_ratio=1.0, max_grad_norm=1e-6)


def test_config_stores_numpy_numbers_as_python_numbers() -> None:
    c = TrainerConfig(batch_size=np.int64(4), lr=np.float32(0.5), betas=[0.9, np.float64(0.99)])
    assert type(c.batch_size) is int and type(c.lr) is float and c.betas == (0.9, 0.99)
    json.dumps(asdict(c))  # the trainer saves its config as JSON


def test_trains_logs_rotates_and_exports_ema(tmp_path: Path) -> None:
    cfg = config(tmp_path, max_steps=60, batch_size=32, lr=1e-2, ema_decay=0.9, keep_last=2)
    task = MLPTask()
    trainer = Trainer(task, Regression(), cfg)
    rows = trainer.train()
    logged = read_csv(tmp_path / "losses.csv")
    assert [int(r["step"]) for r in logged] == list(range(1, 61)) == [r["step"] for r in rows]
    first, last = [r["loss"] for r in logged[:10]], [r["loss"] for r in logged[-10:]]
    assert sum(last) < 0.3 * sum(first), (first, last)
    assert {"loss", "mae", "lr", "grad_norm", "bad_steps", "time"} <= logged[0].keys()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000050", "step_000060"]
    assert (root / "latest").read_text().strip() == "step_000060"
    assert not list(root.glob(".tmp_*"))
    ema = trainer.final_state_dict()
    assert ema.keys() == task.state_dict().keys()
    assert not torch.equal(ema["net.0.weight"], task.net[0].weight.detach())  # averaged, not a copy
    saved = torch.load(root / "step_000060" / "ema.pt")
    assert torch.allclose(saved["net.0.weight"], ema["net.0.weight"])
    # the checkpoint `latest` names wins; without it, the newest complete directory
    (root / "latest").unlink()
    assert ckpt.find_latest(root) == root / "step_000060"


def test_one_process_trains_in_one_precision_then_another(tmp_path: Path) -> None:
    # train-all runs its stages in one process; accelerate alone would refuse a second precision
    runs, computed_in = {}, {}
    for precision in ("bf16", "no"):
        task = MLPTask()
        seen = computed_in[precision] = set()
        task.net[0].register_forward_hook(lambda module, args, out, seen=seen: seen.add(out.dtype))
        trainer = Trainer(task, Regression(), config(tmp_path / precision, max_steps=2, mixed_precision=precision))
        runs[precision] = trainer.train()
        assert trainer.accelerator.mixed_precision == precision
    assert computed_in == {"bf16": {torch.bfloat16}, "no": {torch.float32}}  # each run's matmuls, in its precision
    assert runs["bf16"][-1]["loss"] != runs["no"][-1]["loss"]


class PartTask(MLPTask):
    """Logs a term only some forward calls carry, as (sum, count): call c carries `carried[c]` samples of value c."""

    def __init__(self, carried: dict[int, int]) -> None:
        super().__init__()
        self.carried = carried

    def forward(self, batch, generator):
        out = super().forward(batch, generator)
        n = self.carried.get(self.calls, 0)
        return {**out, "part": (torch.tensor(float(self.calls * n)), float(n))}


def test_a_term_some_steps_lack_is_averaged_over_the_samples_carrying_it_and_nan_where_none_did(tmp_path: Path):
    # 2 micro-batches per step, a row every 2 steps: calls 1-4 make row 1, 5-8 row 2, 9-12 row 3
    task = PartTask({1: 3, 4: 1, 6: 2})
    Trainer(task, Regression(), config(tmp_path, max_steps=6, grad_accum=2, log_every=2, save_every=6)).train()
    rows = read_csv(tmp_path / "losses.csv")
    assert rows[0]["part"] == pytest.approx((1 * 3 + 4 * 1) / 4)  # not the mean of the steps' 1.0 and 4.0
    assert rows[1]["part"] == pytest.approx(6.0)  # one step had none: not averaged in as 0
    assert np.isnan(rows[2]["part"])  # no sample carried it


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_device_computes_it_and_a_resume_elsewhere_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, native: bool) -> None:  # fmt: skip
    import univigu.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: native)
    trainer = Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=2, save_every=2, mixed_precision="auto"))
    capsys.readouterr()
    trainer.train()
    assert f"train ({'bf16' if native else 'float32'})" in capsys.readouterr().err  # the progress bar says which
    want = "bf16" if native else "no"
    assert trainer.accelerator.mixed_precision == want == trainer.config.mixed_precision
    saved = json.loads((tmp_path / "checkpoints" / "step_000002" / "config.json").read_text())
    assert saved["mixed_precision"] == want  # what was used, not "auto"
    # the same run resumed on a machine where auto means the other precision: the math would change
    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: not native)
    again = Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=3, save_every=2, mixed_precision="auto"))
    with pytest.raises(ResumeError, match=f"mixed_precision: checkpoint '{want}'") as refused:
        again.train(resume=True)
    assert f"train.mixed_precision={want} continues in the checkpoint's precision (auto picks bf16 only" in \
        str(refused.value)  # fmt: skip


def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import univigu.training.trainer as trainer_module

    for native in (False, True):
        monkeypatch.setattr(trainer_module, "native_bf16", lambda device: native)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            Trainer(MLPTask(), Regression(), config(tmp_path / str(native), max_steps=1, mixed_precision="bf16"))
        slow = [w for w in said if "bf16 autocast on a CPU without native bf16" in str(w.message)]
        assert len(slow) == (0 if native else 1)


def test_an_fsdp_launch_that_accelerate_runs_unsharded_says_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    with pytest.warns(UserWarning, match=r"FSDP config, but accelerate shards only across GPUs: this run \(NO, 1 "):
        trainer = Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=1))
    assert not trainer.fsdp
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(MLPTask(), Regression(), config(tmp_path / "plain", max_steps=1))


def test_native_bf16_follows_torch_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    from univigu.training.trainer import native_bf16

    cpu = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16(torch.device("cpu")) == cpu
    assert native_bf16(torch.device("meta")) is False
    asked = []  # a GPU that only emulates bf16 (a V100) says yes unless asked for native support
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or including_emulation)  # fmt: skip
    assert native_bf16(torch.device("cuda")) is False and asked == [False]


def test_kill9_resume_is_exact(tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "killed"
    common = ["--max-steps", "50", "--save-every", "10", "--ema", "0.9"]
    run_stub(ref, *common)
    # slow steps (40 ms) so that the kill lands mid-run, right after step_000020 is published
    proc = subprocess.Popen([sys.executable, STUB, str(out), *common, "--sleep", "0.04"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    while not (out / "checkpoints" / "step_000020").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-20 checkpoint"
        time.sleep(0.01)
    # let it log a couple of steps past the checkpoint (rows resume must discard), then kill
    while len((out / "losses.csv").read_text().splitlines()) < 1 + 22:
        assert proc.poll() is None and time.time() < deadline, "run ended before step 22"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = max(losses(out / "losses.csv"))
    resumed_from = int(ckpt.find_latest(out / "checkpoints").name.split("_")[1])
    assert resumed_from < killed_at < 50
    run_stub(out, *common, "--resume")
    got, want = losses(out / "losses.csv"), losses(ref / "losses.csv")
    assert list(got) == list(range(1, 51))  # no duplicated or missing rows
    assert resumed_from <= 30 and len([s for s in got if s > resumed_from]) >= 20
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-6), s
    a, b = ref / "checkpoints" / "step_000050", out / "checkpoints" / "step_000050"
    assert torch.equal(load_file(a / "model.safetensors")["net.0.weight"],
                       load_file(b / "model.safetensors")["net.0.weight"])  # fmt: skip
    assert torch.equal(torch.load(a / "ema.pt")["net.0.weight"], torch.load(b / "ema.pt")["net.0.weight"])


def test_a_checkpoint_saved_by_fsdp_is_refused_by_a_run_without_it(tmp_path: Path) -> None:
    """A checkpoint written in another layout (FSDP shards, FSDP whole weights, plain) failed deep inside
    accelerate's loader, naming a missing file; it is a ResumeError naming both layouts."""
    Trainer(MLPTask(), Regression(), config(tmp_path / "run", max_steps=10)).train()
    step = tmp_path / "run" / "checkpoints" / "step_000010"
    trainer = Trainer(MLPTask(), Regression(), config(tmp_path / "run", max_steps=20))
    trainer._check_layout(step)  # its own layout
    (step / "pytorch_model_fsdp_0").mkdir()
    with pytest.raises(ResumeError, match=r"saved by FSDP as shards \(SHARDED_STATE_DICT\), and this run saves "
                                          "without FSDP"):  # fmt: skip
        trainer._check_layout(step)


class SimulatedKill(Exception):
    pass


def test_kill_during_save_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    ref = Trainer(MLPTask(), Regression(), config(tmp_path / "ref", max_steps=30)).train()
    trainer = Trainer(MLPTask(), Regression(), config(tmp_path / "run", max_steps=30))
    save_state, calls = trainer.accelerator.save_state, []

    def dies_on_second_save(path: str) -> None:
        calls.append(path)
        if len(calls) == 2:  # write part of the state, then "die"
            (Path(path) / "model.safetensors").write_bytes(b"\0" * 10)
            raise SimulatedKill
        save_state(path)

    trainer.accelerator.save_state = dies_on_second_save
    with pytest.raises(SimulatedKill):
        trainer.train()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000010"]
    assert (root / "latest").read_text().strip() == "step_000010"
    assert (root / ".tmp_step_000020").is_dir()  # the debris a kill would leave

    rows = Trainer(MLPTask(), Regression(), config(tmp_path / "run", max_steps=30)).train(resume=True)
    assert [r["step"] for r in rows] == list(range(11, 31))
    for r in rows:
        assert r["loss"] == pytest.approx(ref[r["step"] - 1]["loss"], abs=1e-6)
    assert not list(root.glob(".tmp_*"))
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000020", "step_000030"]


def test_resume_refuses_math_changes_and_overwrites(tmp_path: Path, capsys) -> None:
    Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=10)).train()
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=20)).train()
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.003 -> now 0.01"):
        Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=20, lr=1e-2)).train(resume=True)
    with pytest.warns(UserWarning, match="max_steps changed 10 -> 12"):
        rows = Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=12)).train(resume=True)
    assert [r["step"] for r in rows] == [11, 12]
    # fewer steps than done: nothing trains, and it says so (not that the schedule is stretched)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=5)).train(resume=True)
    assert rows == [] and "the run is at step 12 already, nothing to train" in capsys.readouterr().out


def test_nan_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    task = MLPTask(nan_calls=frozenset({3, 4, 9}))
    rows = Trainer(task, Regression(), config(tmp_path, max_steps=12, ema_decay=0.9)).train()
    by_step = {r["step"]: r for r in rows}
    assert [by_step[s]["bad_steps"] for s in (2, 3, 4, 5, 9, 12)] == [0, 1, 2, 2, 3, 3]
    assert all(torch.isnan(torch.tensor(by_step[s]["loss"])) for s in (3, 4, 9))
    assert all(torch.isfinite(p).all() for p in task.parameters())  # no NaN update got through
    assert torch.isfinite(torch.tensor(rows[-1]["loss"]))


def test_too_many_nan_steps_abort(tmp_path: Path) -> None:
    task = MLPTask(nan_calls=frozenset(range(5, 100)))
    cfg = config(tmp_path, max_steps=30, max_bad_steps=3)
    with pytest.raises(RuntimeError, match=r"aborting at step 8: 4 consecutive steps .*max_bad_steps=3"):
        Trainer(task, Regression(), cfg).train()


def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    # noise off: each process draws its own noise, so only noiseless runs can agree exactly
    common = ["--max-steps", "6", "--save-every", "6", "--grad-accum", "2", "--noise", "0",
              "--dropout", "0", "--ema", "0.9"]  # fmt: skip
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]  # fmt: skip
    # accelerate's CPU launcher needs MPI; torchrun (its --multi_gpu path) + ACCELERATE_USE_CPU gives gloo
    res = subprocess.run([*launch, STUB, str(tmp_path / "ddp"), *common, "--batch-size", "4"],
                         env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    run_stub(tmp_path / "single", *common, "--batch-size", "8")
    ddp_dir = tmp_path / "ddp" / "checkpoints" / "step_000006"
    assert {"generator_0.pt", "generator_1.pt", "random_states_1.pkl"} <= {p.name for p in ddp_dir.iterdir()}
    got, want = losses(tmp_path / "ddp" / "losses.csv"), losses(tmp_path / "single" / "losses.csv")
    assert list(got) == list(want) == list(range(1, 7))
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-4), s
    ema_d = torch.load(ddp_dir / "ema.pt")
    ema_s = torch.load(tmp_path / "single" / "checkpoints" / "step_000006" / "ema.pt")
    for k in ema_s:
        assert torch.allclose(ema_d[k], ema_s[k], atol=1e-5), k


class TinyWanTask(torch.nn.Module):
    """The real transformer (tiny preset, one block) under a toy flow-matching-like loss."""

    def __init__(self) -> None:
        super().__init__()
        from univigu.models.presets import build_model

        torch.manual_seed(0)
        self.model = build_model("tiny", num_layers=1)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        video = batch["x"].reshape(-1, 3, 1, 4, 4).repeat(1, 1, 2, 1, 1)[..., :8, :8]
        noise = torch.randn(video.shape, generator=generator)
        t = torch.rand(video.shape[0], generator=generator)
        tokens = torch.arange(4).repeat(video.shape[0], 1)
        prompt = torch.zeros(video.shape[0], 3, 128)
        out = self.model(t[:, None, None, None, None] * noise + video, tokens, 1000 * t, 1000 * t, prompt)
        velocity, logits = out[0], out[1]
        loss = (velocity - (noise - video)).pow(2).mean() + logits.float().pow(2).mean() * 1e-3
        return {"loss": loss}


class WanData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(48, generator=torch.Generator().manual_seed(i))}


def test_gradient_checkpointing_on_the_real_transformer(tmp_path: Path) -> None:
    runs = {}
    for gc in (False, True, "keep_attention"):
        task = TinyWanTask()
        cfg = config(tmp_path / str(gc), max_steps=3, batch_size=2, gradient_checkpointing=gc)
        runs[gc] = [r["loss"] for r in Trainer(task, WanData(), cfg).train()]
        assert task.model.gradient_checkpointing is bool(gc)
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)
    assert runs["keep_attention"] == pytest.approx(runs[False], abs=1e-5)
    assert runs[True][0] != runs[True][-1]  # it did train
    with pytest.raises(ValueError, match="keep_attention"):
        config(tmp_path / "bad", gradient_checkpointing="attention")


def test_compiled_blocks_train_as_eager(tmp_path: Path, monkeypatch) -> None:
    import torch._functorch.config  # not loaded yet when this test runs alone

    monkeypatch.setattr(torch._functorch.config, "activation_memory_budget", 1.0)  # restored after the test
    runs = {}
    for compile in (False, True):
        task = TinyWanTask()
        budget = 0.5 if compile else None
        cfg = config(tmp_path / str(compile), max_steps=3, batch_size=2, compile=compile, activation_memory_budget=budget)
        runs[compile] = [r["loss"] for r in Trainer(task, WanData(), cfg).train()]
        block = task.model.blocks[0]
        assert (block._compiled_call_impl is not None) is compile
    assert torch._functorch.config.activation_memory_budget == 0.5
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)
    # the setting is process-wide: a later compiled run without a budget (train-all's next stage) is back at 1.0
    Trainer(TinyWanTask(), WanData(), config(tmp_path / "next", compile=True))
    assert torch._functorch.config.activation_memory_budget == 1.0
    with pytest.raises(ValueError, match="activation_memory_budget needs compile"):
        config(tmp_path / "bad", activation_memory_budget=0.5)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=20)).train()
    root = tmp_path / "checkpoints"
    latest = root / "step_000020"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(ResumeError, match=r"step_000020: the checkpoint is damaged .*resume from .*step_000010"):
        Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=20)).train(resume=latest)
    with pytest.warns(UserWarning, match=r"step_000020 is damaged \(model.safetensors is unreadable.*step_000010"):
        rows = Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=20)).train(resume=True)
    assert [r["step"] for r in rows] == list(range(11, 21))
    (root / "step_000010" / "trainer_state.json").unlink()  # now the only earlier one is damaged too
    (latest / "trainer_state.json").unlink()
    with pytest.raises(ResumeError, match=r"step_000020: .*\(no trainer_state.json\); start in a new output_dir"):
        Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=20)).train(resume=True)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """A finished 20-step run with EMA, checkpoints at steps 10 and 20 (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("ema_run")
    Trainer(MLPTask(), Regression(), config(out, max_steps=20, ema_decay=0.9)).train()
    return out


@pytest.mark.parametrize("name, harm, problem", [
    ("optimizer.bin", "delete", r"no optimizer state \(optimizer.bin"),
    ("generator_0.pt", "delete", r"no generator_0.pt"),
    ("ema.pt", "delete", r"no ema.pt \(the run keeps an EMA\)"),
    ("ema.pt", "truncate", r"ema.pt is truncated or unreadable"),
    ("optimizer.bin", "truncate", r"optimizer.bin is truncated or unreadable"),
    # accelerate loaded a half random_states file silently, and the resumed run was no longer exact
    ("random_states_0.pkl", "truncate", r"random_states_0.pkl is truncated or unreadable"),
    ("random_states_0.pkl", "delete", r"no random_states_0.pkl"),
])  # fmt: skip
def test_damaged_training_state_falls_back_to_the_previous_checkpoint(ema_run, tmp_path: Path, name, harm,
                                                                      problem) -> None:  # fmt: skip
    """Each of these was a raw traceback on resume (or, for the RNG states, a silently inexact one)."""
    import shutil

    shutil.copytree(ema_run, tmp_path, dirs_exist_ok=True)
    file = tmp_path / "checkpoints" / "step_000020" / name
    file.unlink() if harm == "delete" else file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    cfg = config(tmp_path, max_steps=20, ema_decay=0.9)
    with pytest.warns(UserWarning, match=rf"step_000020 is damaged \({problem}.*resuming from .*step_000010"):
        rows = Trainer(MLPTask(), Regression(), cfg).train(resume=True)
    assert [r["step"] for r in rows] == list(range(11, 21))


def test_resume_compares_the_run_config_key_by_key(tmp_path: Path) -> None:
    """run_config (a stage's data, model...): a changed, added or removed key, lists included, is a ResumeError
    naming it; a key unset on one side and None on the other is no change; the same config resumes."""
    run = {"model": {"patch_size": [4, 2, 2], "num_layers": 1}, "mix": {}, "data": {"kind": "world"}}
    Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=4), run_config=run).train()
    for now, said in (({**run, "model": {"num_layers": 1}}, "run.model.patch_size: checkpoint [4, 2, 2] -> now None"),
                      ({**run, "mix": {"v2t": 2.0}}, "run.mix.v2t: checkpoint None -> now 2.0"),
                      (None, "run.data.kind: checkpoint 'world' -> now None")):  # fmt: skip
        with pytest.raises(ResumeError, match=re.escape(said)) as refused:
            Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=5), run_config=now).train(resume=True)
        assert "latent cache's videos changed" not in str(refused.value)
    grown = {**run, "cache_rows": {"counts": [3]}}  # a latent cache with videos added since: says what to do
    Trainer(MLPTask(), Regression(), config(tmp_path / "cache", max_steps=4), run_config={**run, "cache_rows": {
        "counts": [2]}}).train()  # fmt: skip
    with pytest.raises(ResumeError, match=r"run.cache_rows.counts: checkpoint \[2\] -> now \[3\]\n.*the latent "
                                          r"cache's videos changed since the run began"):  # fmt: skip
        Trainer(MLPTask(), Regression(), config(tmp_path / "cache", max_steps=5), run_config=grown).train(resume=True)
    same = {**run, "mix": {"cond_dropout": None}, "model": {"num_layers": 1, "patch_size": (4, 2, 2)}}
    rows = Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=5), run_config=same).train(resume=True)
    assert [r["step"] for r in rows] == [5]


def test_resume_refuses_a_model_of_another_shape_before_any_step(tmp_path: Path) -> None:
    Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=10)).train()
    task = MLPTask(dim=4)
    with pytest.raises(ResumeError, match=r"differs .* in 1 weights:\n  net.0.weight: checkpoint \[32, 8\] -> now \[32, 4\]"):
        Trainer(task, Regression(dim=4), config(tmp_path, max_steps=10)).train(resume=True)
    assert task.calls == 0


def test_ema_update_moves_the_shadow_by_one_minus_decay() -> None:
    from univigu.training.ema import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)])
    with torch.no_grad():
        p.fill_(1.0)  # the weight jumps 0 -> 1
    ema.update(0.9)  # shadow = decay * shadow + (1 - decay) * weight
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.1))
    ema.update(0.9)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.19))
    ema.update(0.0)  # decay 0 (before ema_start): an exact copy
    assert torch.equal(ema.shadow["w"], torch.ones(3))
    assert torch.equal(p.detach(), torch.ones(3))  # the live weight is untouched


def test_ema_copies_the_weights_before_ema_start(tmp_path: Path) -> None:
    trainer = Trainer(MLPTask(), Regression(), config(tmp_path, max_steps=5, ema_decay=0.9, ema_start=3))
    ema, update, tracks = trainer.ema, trainer.ema.update, []

    def recording_update(decay: float) -> None:
        update(decay)
        tracks.append(all(torch.equal(ema.shadow[n], p.detach()) for n, p in ema.params.items()))

    ema.update = recording_update
    trainer.train()
    # optimizer steps 1-3 (step indices 0-2 < ema_start) copy the weights; from step 4 on the shadow lags
    assert tracks == [True, True, True, False, False]


def test_gradient_is_clipped_to_max_grad_norm_before_the_optimizer_step(tmp_path: Path) -> None:
    def run(max_norm: float | None) -> tuple[list[float], list[float]]:
        """The gradient norm the optimizer steps on, and the logged (pre-clipping) one, per step."""
        trainer = Trainer(MLPTask(), Regression(), config(tmp_path / str(max_norm), max_steps=3, max_grad_norm=max_norm))
        step, seen = trainer.optimizer.step, []

        def recording_step(*args, **kwargs):
            seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params]))))
            return step(*args, **kwargs)

        trainer.optimizer.step = recording_step
        return seen, [r["grad_norm"] for r in trainer.train()]

    seen, logged = run(1e-3)
    assert len(seen) == 3 and all(g > 0.1 for g in logged), logged  # clipping had work to do
    assert seen == pytest.approx([1e-3] * 3, rel=1e-4), (seen, logged)
    seen, logged = run(None)
    assert seen == pytest.approx(logged, rel=1e-5)


def test_grad_accum_matches_one_big_batch(tmp_path: Path) -> None:
    # noise and dropout off: both runs then see the same samples (the sampler splits the global micro-batches
    # in order) and compute the same mean loss; no clipping, so a mis-scaled gradient shows in grad_norm and
    # (through AdamW's eps and weight decay) in the weights
    runs = {}
    for accum, batch in ((2, 4), (1, 8)):
        task = MLPTask(noise=0.0, dropout=0.0)
        cfg = config(tmp_path / str(accum), max_steps=4, batch_size=batch, grad_accum=accum, max_grad_norm=None)
        rows = Trainer(task, Regression(), cfg).train()
        runs[accum] = rows, {k: v.detach().clone() for k, v in task.state_dict().items()}
    (rows_a, weights_a), (rows_b, weights_b) = runs[2], runs[1]
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
    for k in weights_b:
        assert torch.allclose(weights_a[k], weights_b[k], atol=1e-5), k


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A complete-looking checkpoint folder (the files `damage` reads), published as `latest`."""
    from safetensors.torch import save_file

    tmp = root / f".tmp_{ckpt.step_dir_name(step)}"
    tmp.mkdir(parents=True)
    state = {"step": step, "micro_batches": step, "bad_total": 0, "bad_streak": 0, "elapsed": 1.0}
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    (tmp / "config.json").write_text(json.dumps({"num_processes": 1, "ema_decay": None}))
    save_file({"w": torch.zeros(2, 3)}, tmp / "model.safetensors")
    for name in ("optimizer.bin", "random_states_0.pkl", "generator_0.pt"):  # torch.save, as accelerate writes them
        torch.save({"state": torch.zeros(3)}, tmp / name)
    ckpt.publish(tmp, root / ckpt.step_dir_name(step))
    return root / ckpt.step_dir_name(step)


def test_checkpoint_listing_order_latest_pointer_and_rotation(tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "checkpoints"
    for step in (999_999, 1_000_000, 5):
        _fake_checkpoint(root, step)
    (root / "step_000007").write_text("a file, not a checkpoint")
    # numeric order, not name order ("step_1000000" < "step_999999" as strings); files are not checkpoints
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_000005", "step_999999", "step_1000000"]
    assert (root / "latest").read_text() == "step_000005\n" and ckpt.find_latest(root) == root / "step_000005"
    # `latest` naming a folder that is gone (deleted by hand): the newest that exists
    shutil.rmtree(root / "step_000005")
    assert ckpt.find_latest(root) == root / "step_1000000"
    # rotation keeps the newest keep_last and clears the debris of a killed save
    (root / ".tmp_step_2000000").mkdir()
    ckpt.rotate(root, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_1000000"] and not list(root.glob(".tmp_*"))
    # a kill mid-delete leaves a temp dir (removed by the next rotation), never part of a checkpoint under its name
    _fake_checkpoint(root, 1_000_001)

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            ckpt.rotate(root, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_1000001"]
    assert [p.name for p in root.glob(".tmp_*")] == [".tmp_deleting_step_1000000"]


def test_damage_names_a_missing_or_broken_file(tmp_path: Path) -> None:
    path = _fake_checkpoint(tmp_path, 10)
    assert ckpt.damage(path) is None
    (path / "config.json").write_text('{"truncated": ')
    assert ckpt.damage(path) == "config.json is not valid JSON"
    (path / "config.json").unlink()
    assert ckpt.damage(path) == "no config.json"
    (path / "config.json").write_text("{}")
    (path / "trainer_state.json").write_text("")
    assert ckpt.damage(path) == "trainer_state.json is not valid JSON"


def test_damage_checks_each_file_the_run_saves(tmp_path: Path) -> None:
    path = _fake_checkpoint(tmp_path / "plain", 10)
    assert ckpt.damage(path) is None  # no EMA: no ema.pt, and that is no damage
    (path / "model.safetensors").unlink()
    assert ckpt.damage(path) == "no model weights (model.safetensors or pytorch_model_fsdp*)"
    (path / "trainer_state.json").write_text("[]")  # valid JSON, but not what resuming reads
    assert ckpt.damage(path).startswith("trainer_state.json lacks ['step', ")
    # FSDP, 2 processes, EMA: sharded folders, one generator, RNG state and EMA shard per process
    path = _fake_checkpoint(tmp_path / "fsdp", 10)
    (path / "config.json").write_text(json.dumps({"num_processes": 2, "ema_decay": 0.99}))
    (path / "model.safetensors").unlink()
    (path / "optimizer.bin").unlink()
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        (path / folder).mkdir()
        for shard in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
            (path / folder / shard).write_bytes(b"shard")
    for name in ("random_states_1.pkl", "generator_1.pt", "ema_0.pt", "ema_1.pt"):
        torch.save({"state": torch.zeros(3)}, path / name)
    assert ckpt.damage(path) is None
    (path / "ema_1.pt").unlink()
    assert ckpt.damage(path) == "no ema_1.pt (the run keeps an EMA)"
    torch.save({}, path / "ema_1.pt")
    (path / "generator_1.pt").write_bytes(b"")
    assert ckpt.damage(path).startswith("generator_1.pt is truncated or unreadable")
    torch.save({}, path / "generator_1.pt")
    (path / "pytorch_model_fsdp_0" / ".metadata").unlink()  # written last by torch.distributed.checkpoint
    assert ckpt.damage(path) == "pytorch_model_fsdp_0/ has no .metadata (an incomplete save or copy)"
    (path / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"shard")
    for shard in (path / "optimizer_0").iterdir():
        shard.unlink()
    assert ckpt.damage(path) == "optimizer_0/ is empty"
    (path / "optimizer_0").rmdir()
    assert ckpt.damage(path) == "no optimizer state (optimizer.bin, optimizer_0/ ...)"
    # FSDP with full state dicts (accelerate's default state_dict_type): single files, EMA still per process
    for folder in ("pytorch_model_fsdp_0",):
        shutil.rmtree(path / folder)
    torch.save({}, path / "pytorch_model_fsdp.bin")
    torch.save({}, path / "optimizer.bin")
    assert ckpt.damage(path) is None
    (path / "ema_1.pt").unlink()
    assert ckpt.damage(path) == "no ema_1.pt (the run keeps an EMA)"


def test_replace_dir_swaps_the_whole_folder(tmp_path: Path) -> None:
    final, tmp = tmp_path / "final", tmp_path / ".final.tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    ckpt.replace_dir(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"] and not tmp.exists()


def _folder(path: Path, name: str, files: int = 4) -> None:
    path.mkdir()
    for i in range(files):
        (path / f"{name}_{i}.txt").write_text(name)


def _contents(path: Path) -> str | None:
    """"old" or "new" when `path` is one of those folders whole, None when absent, else what it holds."""
    if not path.exists():
        return None
    names = sorted(p.name for p in path.iterdir())
    for kind in ("old", "new"):
        if names == [f"{kind}_{i}.txt" for i in range(4)]:
            return kind
    return f"a mix: {names}"


@pytest.mark.parametrize("fail", ["rmtree", "rename 1", "rename 2"])
def test_replace_dir_interrupted_leaves_the_old_folder_or_the_new_one(tmp_path: Path, monkeypatch, fail) -> None:
    """`univigu export --overwrite` killed while deleting a big old target left it half deleted: a failure at any
    step (a kill's stand-in: a delete that stops halfway, a rename that raises) leaves it whole-old or whole-new."""
    import shutil

    final, tmp = tmp_path / "final", tmp_path / ".final.tmp"
    _folder(final, "old")
    _folder(tmp, "new")
    rmtree, replace, calls = shutil.rmtree, os.replace, []

    def failing_rmtree(path, *args, **kwargs):  # deletes one file, then "dies"
        next(Path(path).iterdir()).unlink()
        raise OSError("killed mid-delete")

    def failing_replace(src, dst):
        calls.append(src)
        if fail == f"rename {len(calls)}":
            raise OSError("killed mid-rename")
        return replace(src, dst)

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree if fail == "rmtree" else rmtree)
    monkeypatch.setattr(os, "replace", failing_replace)
    try:
        ckpt.replace_dir(tmp, final)
    except OSError:
        pass
    assert _contents(final) in ("old", "new")
    monkeypatch.undo()
    # the next replace (a rerun) clears what an interrupted one left beside the target
    shutil.rmtree(tmp, ignore_errors=True)
    _folder(tmp, "new")
    ckpt.replace_dir(tmp, final)
    assert _contents(final) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_replace_dir_after_a_kill_between_its_renames(tmp_path: Path) -> None:
    """Killed after the old folder was moved aside and before the new one moved in: no target, the old one whole
    aside; the next replace removes it."""
    final, tmp = tmp_path / "final", tmp_path / ".final.tmp"
    _folder(final, "old")
    _folder(tmp, "new")
    ckpt.replace_dir(tmp, final)
    aside = ckpt._aside(final)
    os.replace(final, aside)  # the state a kill between the renames leaves
    _folder(tmp, "new")
    ckpt.replace_dir(tmp, final)
    assert _contents(final) == "new" and not aside.exists()
    # a resume puts the whole old folder back (restore_interrupted); a second process finding it done is fine
    os.replace(final, aside)
    ckpt.restore_interrupted(final)
    ckpt.restore_interrupted(final)
    assert _contents(final) == "new" and not aside.exists()


def test_an_aside_cut_mid_delete_is_never_restored(tmp_path: Path, monkeypatch) -> None:
    """The old folder is renamed out of the aside name before it is deleted: a kill mid-delete leaves no partial
    folder under that name for `restore_interrupted` to take for a whole one."""
    import shutil

    final, tmp = tmp_path / "final", tmp_path / ".final.tmp"
    _folder(final, "old")
    _folder(tmp, "new")
    rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        ckpt.replace_dir(tmp, final)  # the new folder is in; the old one dies half deleted
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert _contents(final) == "new" and not ckpt._aside(final).exists()
    shutil.rmtree(final)  # then the target goes (moved away by hand, say): nothing half-deleted comes back
    ckpt.restore_interrupted(final)
    assert not final.exists()


def test_sampler_order_follows_its_seed() -> None:
    """The seed picks the epoch permutations: another seed, another order (same indices)."""
    a, b = iter(ResumableBatchSampler(50, 8, seed=3)), iter(ResumableBatchSampler(50, 8, seed=4))
    first_a, first_b = [next(a) for _ in range(6)], [next(b) for _ in range(6)]
    assert first_a != first_b
    assert first_a[0] == np.random.default_rng([3, 0]).permutation(50)[:8].tolist()
