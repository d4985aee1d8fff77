import os
import shutil
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from typer.testing import CliRunner

from univigu import UniViGUPipeline
from univigu.cli import app
from univigu.cli.train import CONFIG_DIR
from univigu.training.config import load_config
from univigu.training.trainer import native_bf16

runner = CliRunner()

# A very small base model, so the whole chain trains in seconds.
SMALL = ["model.num_layers=1", "model.attention_head_dim=16", "model.ffn_dim=64", "model.text_dim=32",
         "prompt_encoder.num_layers=1", "train.batch_size=4", "train.max_steps=2", "train.log_every=1"]  # fmt: skip


def test_shipped_configs_load_and_overrides_apply():
    for stage in ("base", "recall", "refine"):
        cfg = load_config(CONFIG_DIR / f"{stage}.yaml")
        assert cfg.stage == stage
    cfg = load_config(CONFIG_DIR / "refine.yaml", ["train.lr=1e-3", "--mix.v2t=5", "flow.text_source=mask"])
    assert cfg.train.lr == 1e-3 and cfg.mix["v2t"] == 5 and cfg.flow.text_source == "mask"
    assert cfg.text_target == "caption"
    # YAML reads a bare `no` as false; the trainer takes it as "no" (the value it means)
    assert load_config(CONFIG_DIR / "base.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        load_config(CONFIG_DIR / "base.yaml", ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="init_from"):
        load_config(None, ["stage=recall"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(CONFIG_DIR / "base.yaml", ["train.lr"])
    with pytest.raises(ValueError, match="regime probabilities|must be"):
        load_config(CONFIG_DIR / "recall.yaml", ["mix.t2v=-1"])



def _flat(output: str) -> str:
    """The text of a rich error panel, unwrapped."""
    return " ".join(output.replace("│", " ").split())


def test_missing_inputs_are_usage_errors(tmp_path):
    cfg = load_config(CONFIG_DIR / "refine.yaml", [f"init_from={tmp_path}"])  # loads: the folder may come later
    with pytest.raises(FileNotFoundError, match=f"init_from {tmp_path}: no model_index.json"):
        cfg.check_inputs()
    result = runner.invoke(app, ["train", str(CONFIG_DIR / "refine.yaml"), f"--init_from={tmp_path}",
                                 f"--train.output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert result.exit_code == 2 and "no model_index.json" in _flat(result.output) and not (tmp_path / "run").exists()
    cache = [*(f"--base.{o}" for o in SMALL), "--refine.data={kind: latent_cache, path: nowhere}"]
    result = runner.invoke(app, ["train-all", "--out", str(tmp_path / "all"), *cache])
    assert result.exit_code == 2 and "data.path: nowhere is not a latent cache (no index.json)" in _flat(result.output)
    result = runner.invoke(app, ["train", str(CONFIG_DIR / "base.yaml"), "--dataset_size=3", "--train.batch_size=4",
                                 f"--train.output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert result.exit_code == 2 and "dataset_size holds 3 videos, fewer than one step takes" in _flat(result.output)
    assert not (tmp_path / "run").exists()


def test_train_all_chains_the_stages_and_resumes(tmp_path):
    args = ["train-all", "--out", str(tmp_path), "--stages", "base,recall,refine"]
    args += [f"--{s}.{o}" for s in ("base", "recall", "refine") for o in SMALL]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    refine = UniViGUPipeline.from_pretrained(tmp_path / "refine" / "final")
    assert refine.unified and set(refine.config.extra) == {"base", "recall", "refine"}  # provenance
    base = UniViGUPipeline.from_pretrained(tmp_path / "base" / "final")
    assert not base.unified
    # the toy base's video RoPE base and output parameterization carry through to the unified model
    assert base.transformer.config.rope_theta == refine.transformer.config.rope_theta == 10.0
    assert base.config.video_prediction == refine.config.video_prediction == "edm"
    # ... and so does the codec's pixel averaging: both denoise 16 x 16 frames and return 32 x 32 videos
    assert base.config.pixel_downsample == refine.config.pixel_downsample == refine.codec.downsample == 2
    assert refine.text_to_video(["a red circle moves up"], num_steps=2, progress=False).videos.shape == (1, 16, 32, 32, 3)
    rows = (tmp_path / "recall" / "losses.csv").read_text().splitlines()
    assert rows[0].startswith("step") and "text" in rows[0] and len(rows) == 3
    # resume: finished stages are kept, nothing is retrained; the first call's stages and overrides need no
    # repeating (OUT/train_all.json: the shipped configs' max_steps would have trained base further)
    chain = ["train-all", "--out", str(tmp_path), "--resume"]
    for again in (runner.invoke(app, args + ["--resume"]), runner.invoke(app, chain)):
        assert again.exit_code == 0 and again.output.count("already done") == 3, again.output
    # a re-export of base killed between its two renames (the old export aside, the new one not in yet): put back
    (tmp_path / "base" / "final").rename(tmp_path / "base" / ".tmp_final.old")
    again = runner.invoke(app, args + ["--resume"])
    assert again.exit_code == 0 and again.output.count("already done") == 3, again.output
    assert (tmp_path / "base" / "final" / "model_index.json").is_file()
    # the toy default skips recall: base then refine
    small = [f"--{s}.{o}" for s in ("base", "refine") for o in SMALL]
    default = runner.invoke(app, ["train-all", "--out", str(tmp_path), "--stages", "base,refine", "--resume", *small])
    assert default.exit_code == 0 and default.output.count("already done") == 2 and "recall" not in default.output
    wrong = runner.invoke(app, ["train-all", "--out", str(tmp_path), "--stages", "refine,base"])
    assert wrong.exit_code != 0 and "in the order of" in wrong.output
    # more steps for an earlier stage: the later ones started from its old export, so the run is refused as it is
    stale = runner.invoke(app, [*args, "--resume", "--recall.train.max_steps=3"])
    assert stale.exit_code == 2 and "stage recall would train from 2 to 3 steps, but" in _flat(stale.output)
    assert "refine already holds a run begun before this recall export" in _flat(stale.output)
    assert "or resume with recall's steps unchanged (--recall.train.max_steps=2)" in _flat(stale.output)
    # refine trained further in the toy default chain (base, refine) would continue a run begun from recall
    other = runner.invoke(app, ["train-all", "--out", str(tmp_path), "--stages", "base,refine", "--resume", *small,
                                "--refine.train.max_steps=3"])  # fmt: skip
    assert other.exit_code == 2 and f"began from {tmp_path / 'recall' / 'final'}" in _flat(other.output)
    # more steps for a finished stage: it continues from its checkpoint (as train --resume does), with the settings
    # it began with (the small model: the shipped config's would be refused)
    longer = runner.invoke(app, [*chain, "--refine.train.max_steps=3"])
    assert longer.exit_code == 0 and "refine: 2 steps done, continuing to 3" in longer.output, longer.output
    refine_extra = UniViGUPipeline.from_pretrained(tmp_path / "refine" / "final").config.extra["refine"]
    assert refine_extra["steps"] == 3
    # another precision than the checkpoint's: refused, naming the stage's override that continues it
    used = refine_extra["mixed_precision"]
    precision = runner.invoke(app, [*args, "--resume", "--refine.train.max_steps=4",
                                    f"--refine.train.mixed_precision={'bf16' if used == 'no' else 'no'}"])  # fmt: skip
    assert precision.exit_code == 2 and f"(train-all: --refine.train.mixed_precision={used})" in _flat(precision.output)
    # overrides are all checked before any stage trains: one naming no stage, or a typo in the last stage's
    fresh = tmp_path / "fresh"
    for extra, message in ((["--train.max_steps=2"], "an override names its stage"),
                           (["--refine.train.max_stepz=3"], "refine overrides: unknown config keys"),
                           (["--refine.dataset_size=1"], "refine overrides: dataset_size holds 1 videos"),
                           (["--base.world.height=24", "--base.world.width=24"],
                            "stage refine trains on videos of another size than stage base's model makes (world.height "
                            "32 vs 24; world.width 32 vs 24): give both stages one size, e.g. "
                            "--refine.world.height=24 --refine.world.width=24")):  # fmt: skip
        bad = runner.invoke(app, ["train-all", "--out", str(fresh), *small, *extra])
        assert bad.exit_code == 2 and message in _flat(bad.output), bad.output
    assert not fresh.exists()  # the base stage did not train first
    # an output folder a file is in the way of, no stages, a configs folder without the stages' YAMLs: usage errors
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    for call, message in ((["train-all", "--out", str(notes / "x"), *small], f"{notes} is a file, not a folder"),
                          (["train-all", "--out", str(notes), *small], f"{notes}: {notes} is a file, not a folder"),
                          (["train", str(CONFIG_DIR / "base.yaml"), f"--train.output_dir={notes / 'x'}"],
                           f"{notes} is a file, not a folder"),
                          (["train-all", "--out", str(fresh), "--stages", "", *small], "stages must be distinct"),
                          (["train-all", "--out", str(fresh), "--configs", str(tmp_path / "nope"), *small],
                           "holds no base.yaml, refine.yaml")):  # fmt: skip
        bad = runner.invoke(app, call)
        assert bad.exit_code == 2 and message in _flat(bad.output), bad.output
    assert not fresh.exists()
    notes.unlink()
    # the whole chain moved to another folder (its records name the old, gone paths): it resumes there
    moved = tmp_path.with_name(tmp_path.name + "_moved")
    shutil.move(tmp_path, moved)
    args = [a if a != str(tmp_path) else str(moved) for a in args]
    further = runner.invoke(app, [*args, "--resume", "--refine.train.max_steps=4"])
    assert further.exit_code == 0 and "refine: 3 steps done, continuing to 4" in further.output, further.output
    # one stage resumed from its own record after the move: refused, naming the folder to pass
    record = moved / "base" / "stage_config.yaml"
    stray = runner.invoke(app, ["train", str(record), "--resume", "--train.max_steps=5"])
    unwrapped = "".join(stray.output.replace("│", "").split())  # rich breaks long paths mid-word
    assert stray.exit_code == 2 and f"wastherunmoved?pass--train.output_dir={moved / 'base'}" in unwrapped
    assert not tmp_path.exists()  # nothing started where the run was


def test_train_all_resumed_gives_a_stage_not_yet_begun_the_first_calls_overrides(tmp_path):
    """A chain killed before its last stage began: --resume alone trains that stage with the first call's
    overrides (it has no run, so no record of its own), not the shipped config's."""
    small = [f"--{s}.{o}" for s in ("base", "refine") for o in SMALL]
    assert runner.invoke(app, ["train-all", "--out", str(tmp_path), *small, "--refine.train.lr=1e-4"]).exit_code == 0
    shutil.rmtree(tmp_path / "refine")
    resumed = runner.invoke(app, ["train-all", "--out", str(tmp_path), "--resume"])
    assert resumed.exit_code == 0 and "resumed with the settings in" in _flat(resumed.output), resumed.output
    record = yaml.safe_load((tmp_path / "refine" / "stage_config.yaml").read_text())
    assert record["train"]["max_steps"] == 2 and record["train"]["lr"] == 1e-4
    assert len((tmp_path / "refine" / "losses.csv").read_text().splitlines()) == 3


def test_train_all_sizes_a_stage_by_its_pipeline_overrides_too():
    """A later stage may train at another size by its pipeline.* sizes (its world set to match): not refused."""
    import typer

    from univigu.cli.train import _check_world_sizes_follow

    def chain(*refine):
        return {"base": load_config(CONFIG_DIR / "base.yaml", []),
                "refine": load_config(CONFIG_DIR / "refine.yaml", ["init_from=base/final", *refine])}  # fmt: skip

    _check_world_sizes_follow(chain("world.frames=8", "pipeline.frames=8"), {"base": False, "refine": False})
    with pytest.raises(typer.BadParameter, match=r"world.frames 8 vs 16\): give both stages one size, e.g. "
                                                 r"--refine.world.frames=16"):  # fmt: skip
        _check_world_sizes_follow(chain("world.frames=8"), {"base": False, "refine": False})


def test_an_interrupted_stage_says_how_to_go_on(tmp_path, monkeypatch):
    from univigu.training import stages

    def interrupted(cfg, resume):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "run_stage", interrupted)
    result = runner.invoke(app, ["train", str(CONFIG_DIR / "base.yaml"), f"--train.output_dir={tmp_path / 'b'}"])
    assert result.exit_code == 130 and "interrupted: univigu train with --resume continues from the start (no " \
        f"checkpoint was written yet in {tmp_path / 'b'})" in _flat(result.output), result.output  # fmt: skip
    result = runner.invoke(app, ["train-all", "--out", str(tmp_path / "chain")])
    assert result.exit_code == 130 and "the same train-all call with --resume" in _flat(result.output)
    (tmp_path / "b" / "checkpoints" / "step_000002").mkdir(parents=True)  # one written before the interrupt
    result = runner.invoke(app, ["train", str(CONFIG_DIR / "base.yaml"), f"--train.output_dir={tmp_path / 'b'}"])
    assert result.exit_code == 130 and f"continues from the last checkpoint in {tmp_path / 'b'}" in _flat(result.output)


def test_train_one_stage_then_resume_further(tmp_path, monkeypatch):
    out = tmp_path / "base"
    monkeypatch.chdir(tmp_path)  # a relative output_dir, as the configs' default is
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded by monkeypatch: removed again after the test
        monkeypatch.delenv(name)
    args = ["train", str(CONFIG_DIR / "base.yaml"), "--train.output_dir=base"] + [f"--{o}" for o in SMALL]
    assert runner.invoke(app, args).exit_code == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # set before CUDA would allocate
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")  # the user's own (torch's newer name) is kept
    # recorded absolute: read from another folder, the record must still name this run (resumed from it below)
    assert yaml.safe_load((out / "stage_config.yaml").read_text())["train"]["output_dir"] == str(out.resolve())
    # another run writing the folder (a killed launcher's workers live on): refused; a lock left by a process that
    # is gone is taken over, and released at the end
    (out / "run.lock").write_text(str(os.getppid()))
    busy = runner.invoke(app, args + ["--train.max_steps=3", "--resume"])
    assert busy.exit_code == 2 and f"is in use by another univigu train (process {os.getppid()})" in \
        _flat(busy.output), busy.output  # fmt: skip
    gone = psutil.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / "run.lock").write_text(str(gone.pid))
    longer = runner.invoke(app, args + ["--train.max_steps=3", "--resume"])
    assert longer.exit_code == 0, longer.output
    steps = [int(line.split(",")[0]) for line in (out / "losses.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3] and not (out / "run.lock").exists()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    bad = runner.invoke(app, ["train", str(CONFIG_DIR / "base.yaml"), "--train.nope=1"])
    assert bad.exit_code != 0 and "train.nope" in bad.output
    # the same folder again without --resume, or resumed with a config that changes the math: usage errors that
    # leave the run's record as it was
    record = (out / "stage_config.yaml").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "holds a finished run" in _flat(again.output), again.output
    changed = runner.invoke(app, args + ["--train.max_steps=3", "--train.lr=0.5", "--resume"])
    assert changed.exit_code == 2 and "lr: checkpoint" in _flat(changed.output), changed.output
    # the rest of the stage config too (the model, the data, the regime mix...), named key by key
    reshaped = runner.invoke(app, args + ["--train.max_steps=3", "--model.num_layers=2", "--resume"])
    assert reshaped.exit_code == 2 and "run.model.num_layers: checkpoint 1 -> now 2" in _flat(reshaped.output)
    for override, said in (("--mix.cond_dropout=0.5", "run.mix.cond_dropout: checkpoint 0.1 -> now 0.5"),
                           ("--data_seed=3", "run.data_seed: checkpoint 0 -> now 3"),
                           ("--flow.train_shift=2", "run.flow.train_shift: checkpoint 3.0 -> now 2.0")):  # fmt: skip
        changed = runner.invoke(app, args + ["--train.max_steps=3", override, "--resume"])
        assert changed.exit_code == 2 and said in _flat(changed.output), changed.output
    same = runner.invoke(app, [*args, f"--train.output_dir={out.resolve()}", "--train.max_steps=3", "--resume"])
    assert same.exit_code == 0, same.output  # nothing changed: it is done already
    # the run's own stage_config.yaml holds its overrides: resumed from it, none needs repeating, from any folder
    monkeypatch.chdir(tmp_path.parent)
    more = runner.invoke(app, ["train", str(out / "stage_config.yaml"), "--resume", "--train.max_steps=4"])
    assert more.exit_code == 0, more.output
    assert not (tmp_path.parent / "base").exists()
    monkeypatch.chdir(tmp_path)
    steps = [int(line.split(",")[0]) for line in (out / "losses.csv").read_text().splitlines()[1:]]
    record = (out / "stage_config.yaml").read_text()  # what the checks below must leave as it is
    assert steps == [1, 2, 3, 4] and "max_steps: 4" in record
    # its checkpoints deleted (to free the disk), the finished run is still not trained over
    import shutil

    shutil.rmtree(out / "checkpoints")
    final = (out / "final" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    for again in (args, [*args, "--resume", "--train.max_steps=5"]):  # --resume would start afresh: refused too
        refused = runner.invoke(app, again)
        assert refused.exit_code == 2 and "and no checkpoint to continue it from" in _flat(refused.output)
    assert (out / "final" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == final
    assert steps == [int(line.split(",")[0]) for line in (out / "losses.csv").read_text().splitlines()[1:]]
    assert (out / "stage_config.yaml").read_text() == record


def test_a_killed_export_leaves_the_old_final_whole(tmp_path, monkeypatch):
    """The exported pipeline is written aside and swapped in: an export that dies half-way (here: after its
    transformer) leaves the previous final/ as it was, not a mix that reads as done."""
    from univigu.training.stages import run_stage

    out = tmp_path / "base"
    args = [f"--{o}" for o in SMALL] + [f"--train.output_dir={out}", "--train.save_every=2"]
    run_stage(load_config(CONFIG_DIR / "base.yaml", args))
    before = {p.relative_to(out): p.read_bytes() for p in (out / "final").rglob("*") if p.is_file()}
    save = UniViGUPipeline.save_pretrained

    def dies_after_the_transformer(self, path, dtype=None):
        self.transformer.save_pretrained(path / "transformer")
        raise KeyboardInterrupt("killed mid-export")

    monkeypatch.setattr(UniViGUPipeline, "save_pretrained", dies_after_the_transformer)
    with pytest.raises(KeyboardInterrupt):
        run_stage(load_config(CONFIG_DIR / "base.yaml", [*args, "--train.max_steps=3"]), resume=True)
    after = {p.relative_to(out): p.read_bytes() for p in (out / "final").rglob("*") if p.is_file()}
    assert after == before
    monkeypatch.setattr(UniViGUPipeline, "save_pretrained", save)
    run_stage(load_config(CONFIG_DIR / "base.yaml", [*args, "--train.max_steps=3"]), resume=True)
    made = UniViGUPipeline.from_pretrained(out / "final").config.extra["base"]
    assert made["steps"] == 3 and made["mixed_precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "no")
    assert not (out / ".final.export-tmp").exists()


def test_train_all_reads_its_configs_folder(tmp_path):
    """--configs: a folder of the user's own stage YAMLs (here the toy ones with base cut to 1 step)."""
    import shutil

    import yaml

    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    base = yaml.safe_load((configs / "base.yaml").read_text())
    base["train"]["max_steps"] = 1
    (configs / "base.yaml").write_text(yaml.safe_dump(base))
    small = [f"--base.{o}" for o in SMALL if not o.startswith("train.max_steps")]
    result = runner.invoke(app, ["train-all", "--out", str(tmp_path / "runs"), "--configs", str(configs),
                                 "--stages", "base", *small])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert UniViGUPipeline.from_pretrained(tmp_path / "runs" / "base" / "final").config.extra["base"]["steps"] == 1


def test_build_task_follows_trainable_text_loss_cond_dropout_and_caption_condition():
    """The stage config's `trainable`, `flow.text_loss`, `mix.cond_dropout` and the pipeline's caption condition
    reach the task it builds."""
    import univigu
    from univigu.training.stages import build_task

    refine = load_config(CONFIG_DIR / "refine.yaml", [f"init_from={univigu.DEFAULT_MODEL}", "trainable=text",
                                                      "flow.text_loss=gkl", "mix.cond_dropout=0.3",
                                                      "pipeline.caption_condition=zeros",
                                                      "pipeline.guidance_text=prompt"])  # fmt: skip
    task, _, pipe_cfg = build_task(refine)
    model = task.transformer
    grads = {name: prm.requires_grad for name, prm in model.named_parameters()}
    assert any(grads.values()) and not all(grads.values())
    assert all(grads[name] == model.is_text_parameter(name) for name in grads)
    assert task.text_loss == "gkl" and task.mix.cond_dropout == 0.3
    assert task.caption_condition == pipe_cfg.caption_condition == "zeros"  # trained as the pipeline will caption
    assert task.guidance_text == pipe_cfg.guidance_text == "prompt"  # ... and guide
    default = build_task(load_config(CONFIG_DIR / "refine.yaml", [f"init_from={univigu.DEFAULT_MODEL}"]))[0]
    assert default.caption_condition == default.guidance_text == "empty_prompt"
    assert default.text_loss == "ce" and all(prm.requires_grad for prm in default.transformer.parameters())
    base = build_task(load_config(CONFIG_DIR / "base.yaml", [*SMALL, "mix.cond_dropout=0.3"]))[0]
    assert base.cond_dropout == 0.3


def test_refine_keeps_the_text_source_of_the_stage_it_starts_from(tmp_path, monkeypatch):
    """flow.text_source unset (the shipped refine configs): the previous pipeline's source, e.g. a recall trained
    with mask; set, it wins. A mask source without any mask token (tokenizer or transformer row) is refused."""
    import dataclasses

    import univigu
    from univigu.training.stages import build_task

    pipe = UniViGUPipeline.from_pretrained(univigu.DEFAULT_MODEL)
    pipe.config = dataclasses.replace(pipe.config, text_source="mask", text_exponent=2.0)
    pipe.save_pretrained(tmp_path / "masked")
    refine = [f"init_from={tmp_path / 'masked'}"]
    _, _, inherited = build_task(load_config(CONFIG_DIR / "refine.yaml", refine))
    assert (inherited.text_source, inherited.text_exponent) == ("mask", 2.0)
    task, _, chosen = build_task(load_config(CONFIG_DIR / "refine.yaml", [*refine, "flow.text_source=uniform"]))
    assert chosen.text_source == task.text_flow.source == "uniform" and chosen.text_exponent == 2.0
    load = UniViGUPipeline.from_pretrained

    def without_mask_token(path, **kwargs):
        loaded = load(path, **kwargs)
        loaded.tokenizer.mask_token = None
        return loaded

    monkeypatch.setattr(UniViGUPipeline, "from_pretrained", staticmethod(without_mask_token))
    with pytest.raises(ValueError, match="flow.text_source mask needs a mask token"):
        build_task(load_config(CONFIG_DIR / "refine.yaml", refine))


def test_the_readme_python_training_block_runs(tmp_path, monkeypatch, capfd):
    """README's "From Python" block, run as written in a scratch folder (a world clip as its clip.mp4), each
    load_config given the tiny sizes too."""
    import univigu
    import univigu.training.config as config_module
    from univigu import World, write_video

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in (part.split("```")[0] for part in readme.split("```python\n")[1:]) if "run_stage" in b)
    monkeypatch.chdir(tmp_path)
    world = World()
    write_video(tmp_path / "clip.mp4", world.render(world.scenes("test", range(1)))[0])
    monkeypatch.setattr(config_module, "load_config",
                        lambda path, overrides: load_config(path, [*overrides, *SMALL]))  # fmt: skip
    exec(block, {})
    assert capfd.readouterr().out.startswith("['")  # the caption printed
    assert (tmp_path / "runs" / "py" / "refine" / "final" / "model_index.json").is_file()
    assert univigu.UniViGUPipeline.from_pretrained("runs/py/refine/final").config.extra["refine"]["steps"] == 2
