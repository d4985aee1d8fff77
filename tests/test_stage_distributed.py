"""The real toy stages under 2-process DDP (gloo, through accelerate) and kill -9 + --resume."""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from univigu.cli.train import CONFIG_DIR

TINY = ["--model.num_layers=1", "--model.attention_head_dim=16", "--model.ffn_dim=64", "--model.text_dim=32",
        "--prompt_encoder.num_layers=1", "--train.log_every=1", "--train.warmup_steps=2"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def univigu(*args: str, **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "univigu", *args], env=ENV, capture_output=True, text=True, **kwargs)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(path: Path) -> dict[int, float]:
    with open(path / "losses.csv") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


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
    1 process x batch 4: noise is keyed by each sample's global position, not by process."""
    common = ["--train.max_steps=3", "--train.save_every=3"]
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "univigu"]  # fmt: skip
    ddp = subprocess.run([*launch, *_recall(base, tmp_path / "ddp", *common, "--train.batch_size=2")],
                         env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert (tmp_path / "ddp" / "checkpoints" / "step_000003" / "generator_1.pt").exists()  # really 2 processes
    univigu(*_recall(base, tmp_path / "one", *common, "--train.batch_size=4"))
    got, want = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert list(got) == list(want) == [1, 2, 3]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-4), step


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
