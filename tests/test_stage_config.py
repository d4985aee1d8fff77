"""Bad stage configs are refused at load time, naming the key, the value and what is valid (the CLI turns these
ValueErrors into usage errors before the run's folder is made)."""

import pytest
from typer.testing import CliRunner

from univigu.cli import app
from univigu.cli.train import CONFIG_DIR
from univigu.training.config import _parse_yaml, load_config

BASE = CONFIG_DIR / "base.yaml"


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=lots", "train.max_steps must be an integer, got 'lots'"),
    ("train.batch_size=2.5", "train.batch_size must be an integer, got 2.5"),
    ("train.batch_size=true", "train.batch_size must be an integer, got True"),  # a bool is not an int
    ("train.lr=-1", "train.lr must be > 0, got -1.0"),
    ("train.betas=3", "train.betas must be a list of 2 numbers, got 3"),
    ("train=3", "train must be a mapping, got 3"),
    ("train.max_steps.x=1", "train.max_steps is 1000, not a section"),
    ("model=3", "model must be a mapping, got 3"),
    ("model.num_layers=0", "model.num_layers must be > 0, got 0"),
    ("model.num_layers=abc", "model.num_layers must be an integer, got 'abc'"),
    ("model.patch_size=[4, 2]", r"model.patch_size must be 3 integers"),
    ("model.bogus=3", r"unknown config keys \['model.bogus'\]; valid: \['added_kv_proj_dim'"),
    ("pipeline.bogus=3", r"unknown config keys \['pipeline.bogus'\]"),
    ("world.frames=abc", "world.frames must be an integer, got 'abc'"),
    ("mix.foo=1", r"unknown config keys \['mix.foo'\]; valid: \['cond_dropout', 'joint', 't2v', 'v2t'\]"),
    ("mix.t2v=abc", "mix.t2v must be a number, got 'abc'"),
    ("mix.cond_dropout=2", r"mix.cond_dropout must be a probability in \[0, 1\], got 2.0"),
    ("data.shuffle=false", r"unknown config keys \['data.shuffle'\]; valid: \['kind'\]"),
    ("data={kind: latent_cache, path: c, buckets: 16x16}",
     r"unknown config keys \['data.buckets'\]; valid: \['bucket', 'kind', 'path'\]"),
    ("train.ema_decay=1.5", r"train.ema_decay must be in \[0, 1\) .* or null for no EMA, got 1.5"),
    ("train.max_grad_norm=0", r"train.max_grad_norm must be > 0 .* or null for no clipping, got 0.0"),
    # the flow's names: each failed only once the model was built, with a traceback
    ("flow.video_loss=bogus", r"flow.video_loss must be one of \('velocity', 'sample', 'edm'\), got 'bogus'"),
    ("flow.time_sampling=normal", r"flow.time_sampling must be one of \('uniform', 'logit-normal'\), got 'normal'"),
    ("flow.text_source=masked",
     r"flow.text_source must be one of \('uniform', 'mask'\) or null \(the previous stage's\), got 'masked'"),
    ("flow.text_loss=kl", r"flow.text_loss must be one of \('ce', 'gkl'\), got 'kl'"),
    ("flow.train_shift=0", "flow.train_shift must be > 0, got 0.0"),
    ("flow.text_exponent=-1", r"flow.text_exponent must be > 0 or null \(the previous stage's\), got -1.0"),
    # a base stage without the generator's sizes built diffusers' defaults, Wan2.1-14B, and was killed for memory
    ("model={}", r"model: the base generator's sizes are missing \(model.attention_head_dim, model.ffn_dim, "
                 r"model.num_attention_heads, model.num_layers, model.text_dim\).*univigu/configs/toy/base.yaml"),
    ("model={num_layers: 1, patch_size: [1, 2, 2]}", r"sizes are missing \(model.attention_head_dim, model.ffn_dim, "
                                                     r"model.num_attention_heads, model.text_dim\)"),
])  # fmt: skip
def test_wrong_types_name_the_key_and_what_is_valid(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(BASE, [override])


def test_a_base_stage_without_a_model_section_is_refused(tmp_path):
    bare = tmp_path / "x.yaml"
    bare.write_text("stage: base\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ValueError, match="model: the base generator's sizes are missing .*Wan2.1-14B's"):
        load_config(bare)
    result = CliRunner().invoke(app, ["train", str(bare), f"--train.output_dir={tmp_path / 'run'}"])
    flat = " ".join(result.output.replace("│", " ").split())  # the error panel, unwrapped
    assert result.exit_code == 2 and "sizes are missing" in flat and not (tmp_path / "run").exists()
    # given explicitly, any sizes load (Wan2.1-1.3B's here); later stages take theirs from init_from
    wan_1b = ["model.num_layers=30", "model.num_attention_heads=12", "model.attention_head_dim=128",
              "model.ffn_dim=8960", "model.text_dim=4096"]  # fmt: skip
    assert load_config(BASE, wan_1b).model["num_layers"] == 30
    assert load_config(None, ["stage=recall", "init_from=somewhere"]).model == {}


@pytest.mark.parametrize("overrides", ["train.lr=1e-3", None, ["train.lr=1e-3", 3]])
def test_overrides_must_be_a_list_of_strings(overrides):
    # one string was split into one-character overrides: "override 't' is not of the form key=value"
    with pytest.raises(TypeError, match='overrides must be a list of "key=value" strings'):
        load_config(BASE, overrides)


def test_numbers_yaml_leaves_as_strings_are_read():
    cfg = load_config(BASE, ["train.lr=1e-3", "model.rope_theta=1e4", "pipeline.guidance_scale=5", "mix.v2t=2e0"])
    assert cfg.train.lr == 1e-3 and cfg.model["rope_theta"] == 1e4 and cfg.pipeline["guidance_scale"] == 5.0
    assert cfg.mix["v2t"] == 2.0
    assert cfg.model["patch_size"] == (4, 2, 2)


def test_impossible_sizes_are_refused_at_load_time():
    with pytest.raises(ValueError, match="pipeline.prompt_length 2 is too short .* longest has 5 tokens.* >= 6"):
        load_config(BASE, ["pipeline.prompt_length=2"])
    with pytest.raises(ValueError, match=r"world.frames 17 must be a multiple of 4 .*model.patch_size \[4, 2, 2\]"):
        load_config(BASE, ["world.frames=17"])
    with pytest.raises(ValueError, match=r"world.height 34 must be a multiple of 4 .*pixel_downsample 2"):
        load_config(BASE, ["world.height=34"])


def test_bad_yaml_files_name_the_file(tmp_path):
    broken, listed, empty, no_stage = (tmp_path / f"{n}.yaml" for n in ("broken", "listed", "empty", "no_stage"))
    broken.write_text("stage: base\ntrain: {max_steps: 1\n")
    listed.write_text("- stage\n")
    empty.write_text("")
    no_stage.write_text("train: {max_steps: 1}\n")
    with pytest.raises(ValueError, match=f'CONFIG {broken} is not valid YAML(.|\n)*in "{broken}", line 2'):
        load_config(broken)
    with pytest.raises(ValueError, match=f"CONFIG {listed} must be a mapping of config keys, got a list"):
        load_config(listed)
    with pytest.raises(ValueError, match=f"CONFIG {empty} is empty; start from univigu/configs/toy/base.yaml"):
        load_config(empty)
    with pytest.raises(ValueError, match=f"CONFIG {no_stage} gives no stage"):
        load_config(no_stage)
    with pytest.raises(ValueError, match=r"override 'train=\{a: 1' is not valid YAML"):
        load_config(BASE, ["train={a: 1"])
    twice = tmp_path / "twice.yaml"  # PyYAML alone keeps the last value: a silent half of an edit
    twice.write_text("stage: base\ntrain:\n  lr: 1.0e-3\n  max_steps: 2\n  lr: 5.0e-4\n")
    with pytest.raises(ValueError, match=f"CONFIG {twice} is not valid YAML: key 'lr' is given twice(.|\n)*line 5"):
        load_config(twice)
    # YAML merge keys still merge (a key the mapping repeats overrides the merged one: not "given twice")
    data = _parse_yaml("defaults: &d {lr: 1.0e-3, max_steps: 3}\ntrain: {<<: *d, max_steps: 5}\n", "x")
    assert data["train"] == {"lr": 1.0e-3, "max_steps": 5}


def test_the_cli_refuses_them_before_making_the_run_folder(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(BASE), "--train.batch_size=2.5", f"--train.output_dir={out}"])
    assert result.exit_code == 2 and "train.batch_size must be an integer" in result.output and not out.exists()


@pytest.mark.parametrize("override, message", [
    ("world.frames=8", r"world's videos are not the size of .*toy-base's pipeline \(world.frames 8 vs 16\)"),
    ("pipeline.text_length=3", "pipeline.text_length 3 is too short for the world's prompts"),
    ("pipeline.prompt_length=4", "pipeline.prompt_length 4 is too short"),
])  # fmt: skip
def test_a_stage_from_a_pipeline_checks_the_world_against_it(override, message):
    """Found before the model loads: the first trained on another video size than it exports, the others failed
    mid-run."""
    from univigu import DEFAULT_MODEL

    base = str(DEFAULT_MODEL).replace("toy-model", "toy-base")
    cfg = load_config(CONFIG_DIR / "refine.yaml", [f"init_from={base}", override])
    with pytest.raises(ValueError, match=message):
        cfg.check_inputs()
    load_config(CONFIG_DIR / "refine.yaml", [f"init_from={base}"]).check_inputs()  # the shipped config fits


def test_prompt_canvas_must_hold_the_longest_prompt_and_its_end_token():
    from univigu.training.config import _longest_world_prompt

    longest = _longest_world_prompt()
    with pytest.raises(ValueError, match=f"prompt_length {longest} is too short"):
        load_config(BASE, [f"pipeline.prompt_length={longest}"])
    assert load_config(BASE, [f"pipeline.prompt_length={longest + 1}"]).pipeline["prompt_length"] == longest + 1


def test_data_seed_and_world_reach_the_stage_dataset():
    ds = load_config(BASE, ["data_seed=7", "dataset_size=12"]).dataset()[0]
    assert (ds.seed, ds.size, ds.split) == (7, 12, "train")
    assert ds[3]["caption"] == ds.world.scenes("train", [3], 7)[0].caption
