"""benchmarks/wan_scale.py runs at a CPU size: latency table, Wan parity, training-step figures, the profile."""

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from threads import torch_threads

ROOT = Path(__file__).parents[1]


def wan_scale(*args: str) -> None:
    """`python benchmarks/wan_scale.py ARGS` in this process (a process start is seconds of imports), on one
    thread."""
    argv = sys.argv
    sys.argv = [str(ROOT / "benchmarks" / "wan_scale.py"), *args]
    try:
        with torch_threads(1):
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv


def test_wan_scale_benchmark_runs_and_profiles(tmp_path, monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded by monkeypatch: removed again after the test
        monkeypatch.delenv(name)
    args = ["--preset", "tiny", "--layers", "2", "--latent", "4", "16", "16", "--text-len", "16", "--prompt-len", "8",
            "--steps", "1", "--warmup", "1", "--train-steps", "1", "--device", "cpu", "--dtype", "float32",
            "--profile", "--text-padding", "4", "--out", str(tmp_path)]  # fmt: skip
    wan_scale(*args)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["parity_max_abs_diff"] == 0.0  # float32: the unified model without text is Wan
    # the benchmark's allocator default, recorded
    assert result["allocator"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": None}
    assert set(result["latency_ms"]) == {"wan (diffusers)", "unified, no text", "unified T2V step",
                                         "unified V2T step", "unified joint step",
                                         "unified T2V step, padded prompt",
                                         "unified guided T2V step, one pass of 2B, masked",
                                         "unified guided T2V step, two passes"}  # fmt: skip
    assert result["guided_two_passes_over_one"] > 0
    assert result["t2v_padded_over_wan"] > 0
    assert result["train_step_s"] > 0 and result["train_forward_tflop"] > 0 and result["mfu"] is None  # no GPU peak
    profile = result["profile"]
    assert set(profile["seconds"]) == {"attention", "matmul", "optimizer", "other"}
    assert abs(sum(profile["seconds"].values()) - profile["total_s"]) < 1e-6
    assert profile["seconds"]["matmul"] > 0 and profile["seconds"]["attention"] > 0
    assert profile["seconds"]["optimizer"] > 0  # fused AdamW is one named kernel
    assert "| matmul |" in (tmp_path / "result.md").read_text()
    assert result["text_padding"] == 4 and "4 text positions masked" in (tmp_path / "result.md").read_text()


def test_wan_scale_refuses_sizes_before_building_the_model(capsys):
    refusals = ((["--latent", "4", "15", "16"], "--latent 4 15 16: each must be a multiple of the patch [1, 4, 4]"),
                (["--text-len", "16", "--text-padding", "16"], "--text-padding must be in [0, --text-len)"))
    for args, said in refusals:
        with pytest.raises(SystemExit) as exit:
            wan_scale("--preset", "tiny", "--device", "cpu", *args)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and said in err and "model built" not in err, err


def test_interleaved_medians_alternate_the_functions_and_take_medians(monkeypatch):
    """Each round runs every function once, in turn (load bursts hit all alike); warmup rounds are not timed; the
    result is each function's median, syncing around every call."""
    from univigu.evaluation import timing

    clock, calls, syncs = iter(range(1000)), [], []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    medians = timing.interleaved_medians(fns, steps=3, warmup=1, sync=lambda: syncs.append(1))
    assert calls == ["a", "b"] * 4 and len(syncs) == 2 * 2 * 3
    assert medians == {"a": 1, "b": 1}  # each timed call spans one tick of the fake clock
    assert timing.synchronizer("cpu")() is None


@pytest.mark.parametrize("section, folder, rows_at_least", [("## GPU: one NVIDIA H100", "h100", 8),
                                                             ("## GPU: one NVIDIA H200, 2026-11-27", "h200", 7)])
def test_the_gpu_training_tables_are_their_result_files(section, folder, rows_at_least):
    """Each row of a GPU section's training-step table in benchmarks/README.md (flags -> step, MFU, peak memory) is
    the stored result.json with those flags: the memory-budget rows were once swapped by hand."""
    import re

    results = []
    for path in (ROOT / "benchmarks" / "results" / folder).glob("*/result.json"):
        r = json.loads(path.read_text())
        wan_size = r.get("preset") == "wan2.1-t2v-1.3b" and r.get("latent") == [21, 60, 104]  # the tables' size
        if "train_step_s" in r and r.get("gradient_checkpointing") and wan_size:
            results.append(r)
    text = (ROOT / "benchmarks" / "README.md").read_text()
    text = text[text.index(section):]
    text = text[:text.find("\n## ")]
    rows = [line for line in text.splitlines()
            if line.startswith("| `--checkpointing") and "out of memory" not in line]  # fmt: skip
    assert len(rows) >= rows_at_least

    def option(flags: str, name: str) -> str | None:
        found = re.search(rf"--{name} (\S+)", flags)
        return found[1] if found else None

    for row in rows:
        flags, step, mfu, memory = [cell.strip() for cell in row.strip("|").split("|")]
        flags = re.search(r"`([^`]*)`", flags).group(1)
        budget = option(flags, "memory-budget")
        want = {"gradient_checkpointing": option(flags, "checkpointing"),
                "attention_backend": option(flags, "attention-backend") or "native",
                "compile": "--compile" in flags, "memory_budget": budget and float(budget),
                "text_padding": int(option(flags, "text-padding") or 0)}  # fmt: skip
        defaults = {"compile": False, "text_padding": 0}  # keys older result files lack
        match = [r for r in results if all(r.get(k, defaults.get(k)) == v for k, v in want.items())]
        assert len(match) == 1, (row, want)
        r = match[0]
        assert step.strip("*") == f"{r['train_step_s']:.3f} s", row
        assert mfu.strip("*") == f"{100 * r['mfu']:.1f}%", row
        assert memory == f"{r['peak_memory_gib']:.1f} GiB", row


def test_train_sweep_runs_each_configuration_and_tabulates(tmp_path):
    """benchmarks/train_sweep.sh at a CPU size: each named configuration in its folder, a failed one (the masked
    configuration's 200 padded positions do not fit a 16-token text stream) listed as failed, the sweep going on;
    with TOTAL_S too small for a run, each configuration is skipped, not started."""
    size = "--preset tiny --layers 2 --latent 4 16 16 --text-len 16 --prompt-len 8 --device cpu --dtype float32"
    env = {**os.environ, "SIZE": size, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    script = str(ROOT / "benchmarks" / "train_sweep.sh")
    res = subprocess.run(["bash", script, str(tmp_path), "compile_none_b0.3_pad200", "keep_attention"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "keep_attention" / "result.json").read_text())
    assert result["gradient_checkpointing"] == "keep_attention" and result["train_step_s"] > 0
    rows = (tmp_path / "summary.md").read_text().splitlines()[2:]
    assert re.fullmatch(r"\| compile_none_b0.3_pad200 \| failed \(see compile_none_b0.3_pad200/log.txt\) \| \| \| "
                        r"rc [1-9]\d* in \d+ s \|", rows[0]), rows[0]  # fmt: skip
    assert re.fullmatch(rf"\| keep_attention \| {result['train_step_s']:.3f} s \|  \|  \| rc 0 in \d+ s \|", rows[1])
    log = (tmp_path / "keep_attention" / "log.txt").read_text()
    assert re.search(r"\] training step 2: \d+\.\d{3} s", log), log  # the phases are timestamped
    res = subprocess.run(["bash", script, str(tmp_path / "t"), "keep_attention"],
                         env={**env, "TOTAL_S": "5", "PER_RUN_S": "10"}, capture_output=True, text=True)
    assert res.returncode == 0 and "keep_attention: skipped" in res.stdout, res.stdout + res.stderr
    assert not (tmp_path / "t" / "keep_attention").exists()
    assert "| keep_attention | skipped (TOTAL_S) |" in (tmp_path / "t" / "summary.md").read_text()
    res = subprocess.run(["bash", script, str(tmp_path / "x"), "no_such"], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown configuration no_such" in res.stderr
    res = subprocess.run(["bash", script, str(tmp_path / "x"), "keep_attention"], env={**env, "PER_RUN_S": "5m"},
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "PER_RUN_S and TOTAL_S are whole seconds, got 5m" in res.stderr
