"""The real toy stages under 2-process DDP (gloo, through accelerate) and kill -9 + --resume.

The single-process runs the launched ones are held to run in this process (a process start is seconds of
imports), on one thread as the launched processes."""

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fsdp_on_cpu import launch
from safetensors.torch import load_file
from threads import torch_threads
from typer.testing import CliRunner

from univigu.cli import app
from univigu.cli.train import CONFIG_DIR

TINY = ["--model.num_layers=1", "--model.attention_head_dim=16", "--model.ffn_dim=64", "--model.text_dim=32",
        "--prompt_encoder.num_layers=1", "--train.log_every=1", "--train.warmup_steps=2"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def univigu(*args: str) -> None:
    """`univigu ARGS` in this process, on one thread."""
    with torch_threads(1):
        result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)


def losses(path: Path, column: str = "loss") -> dict[int, float]:
    with open(path / "losses.csv") as f:
        return {int(row["step"]): float(row[column]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    univigu("train", str(CONFIG_DIR / "base.yaml"), f"--train.output_dir={out}", "--train.max_steps=2",
            "--train.batch_size=4", *TINY)  # fmt: skip
    return out / "final"


def _recall(base: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(CONFIG_DIR / "recall.yaml"), f"--init_from={base}", f"--train.output_dir={out}",
            "--train.log_every=1", "--train.warmup_steps=2", *extra]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(base, tmp_path):
    """Knowledge Recall (unified model, regime mix, noise) on 2 gloo processes x batch 2 equals
    1 process x batch 4: noise is keyed by each sample's global position, not by process. The logged loss
    terms too (each over the samples that carry it, whichever process holds them)."""
    common = ["--train.max_steps=3", "--train.save_every=3"]
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "univigu"]  # fmt: skip
    ddp = subprocess.run([*launch, *_recall(base, tmp_path / "ddp", *common, "--train.batch_size=2")],
                         env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("stage recall done") == 1  # said once, not once per process
    assert (tmp_path / "ddp" / "checkpoints" / "step_000003" / "generator_1.pt").exists()  # really 2 processes
    univigu(*_recall(base, tmp_path / "one", *common, "--train.batch_size=4"))
    # both continued one more step from their checkpoints (a DDP resume read the wrapper's names and was refused)
    more = ["--train.max_steps=4", "--train.save_every=3", "--resume"]
    ddp = subprocess.run([*launch, *_recall(base, tmp_path / "ddp", *more, "--train.batch_size=2")],
                         env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)  # fmt: skip
    assert ddp.returncode == 0 and "resumed from" in ddp.stdout + ddp.stderr, ddp.stderr[-3000:]
    assert (ddp.stdout + ddp.stderr).count("max_steps changed 3 -> 4") == 1  # said once, not once per process
    univigu(*_recall(base, tmp_path / "one", *more, "--train.batch_size=4"))
    for column in ("loss", "text", "video"):
        got, want = losses(tmp_path / "ddp", column), losses(tmp_path / "one", column)
        assert list(got) == list(want) == [1, 2, 3, 4]
        for step in want:
            assert got[step] == pytest.approx(want[step], abs=1e-4), (column, step)


def test_kill9_then_resume_continues_the_same_loss_curve(base, tmp_path):
    common = ["--train.max_steps=30", "--train.save_every=5", "--train.batch_size=4"]
    univigu(*_recall(base, tmp_path / "reference", *common))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "univigu", *_recall(base, killed, *common)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_000010").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-10 checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    univigu(*_recall(base, killed, *common), "--resume")
    got, want = losses(killed), losses(tmp_path / "reference")
    assert sorted(got) == list(range(1, 31))
    resumed = [s for s in range(11, 31)]
    assert max(abs(got[s] - want[s]) for s in resumed) < 1e-6


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "transformer" / "diffusion_pytorch_model.safetensors")


def _fsdp(base: Path, out: Path, *args: str, **accelerate: object) -> None:
    """A recall run under the shipped FSDP config on 2 CPU processes."""
    launch(_recall(base, out, *args), out.parent, **accelerate)


def test_fsdp_two_processes_match_one_process_and_resume_from_shards(base, tmp_path):
    """FSDP2 (the shipped config, one unit per UniViGUBlock) on 2 CPU processes x batch 2 trains as 1 process
    x batch 4 does (losses, gradient norms over all shards, exported weights), saves sharded checkpoints, and
    a run resumed from one of them continues exactly, here under the several-node config (the same FSDP
    settings) as two machines of one process each (two launchers on this machine)."""
    common = ["--train.max_steps=4", "--train.save_every=2", "--train.mixed_precision=no"]  # float32: exact
    _fsdp(base, tmp_path / "fsdp", *common, "--train.batch_size=2", mixed_precision="no")
    step2 = tmp_path / "fsdp" / "checkpoints" / "step_000002"
    assert {p.name for p in step2.iterdir()} >= {"pytorch_model_fsdp_0", "optimizer_0", "ema_0.pt", "ema_1.pt"}
    univigu(*_recall(base, tmp_path / "one", *common, "--train.batch_size=4"))
    with open(tmp_path / "fsdp" / "losses.csv") as f_sharded, open(tmp_path / "one" / "losses.csv") as f_one:
        sharded, one = list(csv.DictReader(f_sharded)), list(csv.DictReader(f_one))
    assert [r["step"] for r in sharded] == [r["step"] for r in one] == ["1", "2", "3", "4"]
    for a, b in zip(sharded, one):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-5)  # clipping uses it
    got, want = _weights(tmp_path / "fsdp"), _weights(tmp_path / "one")  # whole, with the EMA
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5

    # as if killed after the step-2 checkpoint: resume from the shards
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    shutil.rmtree(resumed / "final")
    (resumed / "checkpoints" / "latest").write_text("step_000002\n")
    launch(_recall(base, resumed, *common, "--train.batch_size=2", "--resume"), tmp_path, config="fsdp_multinode",
           mixed_precision="no")  # fmt: skip
    assert {p.name for p in (resumed / "checkpoints" / "step_000004").iterdir()} >= {
        "pytorch_model_fsdp_0", "generator_0.pt", "generator_1.pt"}  # fmt: skip
    assert losses(resumed) == pytest.approx(losses(tmp_path / "fsdp"), abs=1e-6)
    again = _weights(resumed)
    assert max((again[k] - got[k]).abs().max().item() for k in got) < 1e-6


@pytest.fixture(scope="module")
def one_process(base, tmp_path_factory) -> Path:
    """Two float32 recall steps at batch 4 in one process: what the two-step FSDP runs below are held to."""
    out = tmp_path_factory.mktemp("one") / "run"
    univigu(*_recall(base, out, "--train.max_steps=2", "--train.batch_size=4", "--train.mixed_precision=no"))
    return out


def test_fsdp_bf16_with_checkpointing_trains(base, one_process, tmp_path):
    """The shipped FSDP config as is (bf16 weights in compute) with the trainer's selective checkpointing: the
    bf16 losses follow the float32 ones of one process."""
    # bf16 asked for: the toy stages' auto is float32 on a CPU without native bf16
    _fsdp(base, tmp_path / "bf16", "--train.max_steps=2", "--train.batch_size=2",
          "--train.gradient_checkpointing=keep_attention", "--train.mixed_precision=bf16")  # fmt: skip
    got, want = losses(tmp_path / "bf16"), losses(one_process)
    assert list(got) == list(want) == [1, 2]
    assert got[1] != want[1]  # really in bf16
    assert got == pytest.approx(want, rel=1e-2)
    assert _weights(tmp_path / "bf16")["patch_embedding.weight"].dtype == torch.float32  # exported whole, float32


def test_fsdp_with_compiled_blocks_trains_as_eager(base, one_process, tmp_path):
    """FSDP with the trainer's regional compilation (the fastest single-GPU setting, benchmarks/README.md):
    the compiled sharded blocks give the eager losses (of one process, which eager FSDP matches: above)."""
    _fsdp(base, tmp_path / "compiled", "--train.max_steps=2", "--train.mixed_precision=no", "--train.batch_size=2",
          "--train.compile=true", mixed_precision="no")  # fmt: skip
    assert list(losses(tmp_path / "compiled")) == [1, 2]
    assert losses(tmp_path / "compiled") == pytest.approx(losses(one_process), abs=1e-4)
