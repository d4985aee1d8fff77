"""The three training stages: each one's task built from its config (`build_task`) and trained and exported
(`run_stage`). Their configs are `config.StageConfig`; `univigu train-all` chains them.

    base    a plain Wan text-to-video generator and its prompt encoder (the toy world's
            stand-in for "a pretrained Wan2.1")
    recall  Knowledge Recall: the unified model built from the base with `from_wan`, trained
            on the regime mix with the prompt as the text target
    refine  Capability Refinement: the same, with the detailed caption as the text target

Each stage ends by exporting a pipeline folder (`OUTPUT_DIR/final`, EMA weights when EMA is on)
that the next stage's `init_from` names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from univigu.data.codec import PixelCodec
from univigu.data.latent_cache import CacheError, LatentCacheDataset
from univigu.data.tokenizer import TextCanvas, build_world_tokenizer
from univigu.data.world import WorldConfig
from univigu.flow.regimes import RegimeMix
from univigu.flow.text import TextFlow
from univigu.flow.video import VideoFlow
from univigu.models.prompt_encoder import PromptEncoder
from univigu.models.transformer import UniViGUTransformer
from univigu.models.wan import set_rope_theta
from univigu.pipelines.pipeline import PipelineConfig, UniViGUPipeline, is_wan_release
from univigu.training import checkpoint as ckpt
from univigu.training.config import StageConfig
from univigu.training.tasks import CachedLatentTask, GeneratorTask, UnifiedTask
from univigu.training.trainer import Trainer


def build_task(cfg: StageConfig) -> tuple[torch.nn.Module, Any, PipelineConfig]:
    """(task, tokenizer, pipeline config) for a stage; `init_from` is loaded for recall/refine."""
    flow = cfg.flow
    if cfg.stage == "base":
        from diffusers import WanTransformer3DModel

        tokenizer = build_world_tokenizer()
        world = WorldConfig(**cfg.world)
        pipe_cfg = PipelineConfig(frames=world.frames, height=world.height, width=world.width, **cfg.pipeline)
        video_flow = _video_flow(cfg, pipe_cfg)
        model_cfg = dict(cfg.model)
        theta = model_cfg.pop("rope_theta", None)  # not a diffusers argument: set on the built model
        wan = WanTransformer3DModel(in_channels=3, out_channels=3, **model_cfg)
        if theta is not None:
            set_rope_theta(wan, theta)
        prompt_encoder = PromptEncoder(vocab_size=len(tokenizer), max_length=pipe_cfg.prompt_length,
                                       **{"dim": wan.config.text_dim, **cfg.prompt_encoder})  # fmt: skip
        task = GeneratorTask(wan, prompt_encoder, TextCanvas(tokenizer, pipe_cfg.prompt_length), video_flow,
                             cond_dropout=RegimeMix(**cfg.mix).cond_dropout,
                             codec=PixelCodec(pipe_cfg.pixel_downsample))  # fmt: skip
        return task, tokenizer, pipe_cfg

    # A Wan2.1 folder loads as its own generator, so that Knowledge Recall builds the unified model from it
    # below with this stage's options (text_ffn, init, the mask row), as from a toy base generator.
    previous = (UniViGUPipeline.from_wan(cfg.init_from, unified=False) if is_wan_release(cfg.init_from)
                else UniViGUPipeline.from_pretrained(cfg.init_from))  # fmt: skip
    tokenizer = previous.tokenizer
    source = flow.text_source or previous.config.text_source
    exponent = previous.config.text_exponent if flow.text_exponent is None else flow.text_exponent
    pipe_cfg = dataclasses.replace(previous.config, **{**cfg.pipeline, "text_source": source,
                                                       "text_exponent": exponent})  # fmt: skip
    text_canvas = TextCanvas(tokenizer, pipe_cfg.text_length)
    video_flow = _video_flow(cfg, pipe_cfg)  # the parameterization the base was trained with
    needs_row = source == "mask" and tokenizer.mask_token_id is None
    if previous.unified:
        transformer = previous.transformer
        if needs_row and not transformer.config.text_mask_row:
            raise ValueError(f"flow.text_source mask needs a mask token, and neither {cfg.init_from}'s tokenizer nor "
                             "its transformer has one (a mask row is added when Knowledge Recall starts from a "
                             "generator): keep its source, uniform")  # fmt: skip
    else:  # Knowledge Recall starts from the generator, as Uni-ViGU starts from Wan2.1
        wan = previous.transformer
        if cfg.init == "scratch":  # the fresh weights the base stage starts from (the ablation of the prior)
            wan = type(wan).from_config(wan.config)
        transformer = UniViGUTransformer.from_wan(wan, text_vocab_size=len(tokenizer), text_mask_row=needs_row,
                                                  text_ffn=cfg.text_ffn)  # fmt: skip
    if cfg.attention_layout is not None:  # a config switch, no weights: saved with the transformer's config
        transformer.register_to_config(attention_layout=cfg.attention_layout)
    transformer.train()
    transformer.set_trainable(cfg.trainable)
    text_flow = TextFlow(len(tokenizer), source=source, mask_id=text_canvas.mask_id, exponent=exponent)
    task_cls, extra = UnifiedTask, {"codec": previous.codec}  # the video space the previous stage learned
    if cfg.data.get("kind") == "latent_cache":
        cache = cfg.dataset()[0]
        cache.check_texts(text_canvas, ("prompt", "caption") if cfg.text_target == "caption" else ("prompt",))
        same = sum(r.prompt == r.caption for r in cache.records()) if cfg.text_target == "caption" else 0
        if same and is_main_process():  # a captions file row with one text uses it for both
            warnings.warn(f"{same} of the {len(cache)} cached videos have their prompt as their caption (their "
                          "captions file row gave one text): this stage trains it as their detailed caption",
                          stacklevel=2)  # fmt: skip
        made_by, ours = cache.index.get("latent_space"), getattr(previous.codec, "latent_space", None)
        if made_by is not None and ours is not None and made_by != ours():  # caches before it was recorded: trusted
            raise CacheError(f"{cfg.data['path']} holds latents of another VAE than {cfg.init_from}'s (channels or "
                             "normalisation differ): cache the videos again with init_from's Wan folder")  # fmt: skip
        pipe_cfg = dataclasses.replace(pipe_cfg, **dict(zip(("frames", "height", "width"), cache.frame_size)))
        if cache.index["settings"].get("fps"):  # the rate its clips were sampled at: videos play at their speed
            pipe_cfg = dataclasses.replace(pipe_cfg, fps=round(cache.index["settings"]["fps"]))
        task_cls, extra = CachedLatentTask, {"null_states": cache.null_prompt_states()}
    task = task_cls(
        transformer, previous.prompt_encoder, TextCanvas(tokenizer, pipe_cfg.prompt_length), text_canvas,
        video_flow, text_flow, RegimeMix(**cfg.mix), text_target=cfg.text_target,
        video_weight=cfg.video_weight, text_weight=cfg.text_weight, text_loss=flow.text_loss,
        caption_condition=pipe_cfg.caption_condition, guidance_text=pipe_cfg.guidance_text, **extra,
    )  # fmt: skip
    task.export_parts = (previous.prompt_encoder, previous.codec)  # a tuple: not submodules of the task
    return task, tokenizer, pipe_cfg


def _video_flow(cfg: StageConfig, pipe_cfg: PipelineConfig) -> VideoFlow:
    flow = cfg.flow
    return VideoFlow(shift=flow.train_shift, time_sampling=flow.time_sampling, prediction=pipe_cfg.video_prediction,
                     loss_space=flow.video_loss, sigma_data=pipe_cfg.video_sigma_data)  # fmt: skip


def is_main_process() -> bool:
    """Whether this is the launcher's rank 0 (or there is no launcher): what says so before an Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def run_stage(cfg: StageConfig, resume: bool | str = False) -> Path:
    """Train one stage and export its pipeline folder (`output_dir/final`); returns that folder. The output folder
    is locked for the run (`RunFolderInUse` while another run writes there)."""
    cfg.check_inputs()
    out = Path(cfg.train.output_dir)
    main = is_main_process()
    fresh = not out.exists()
    try:
        with ckpt.sole_run(out, "univigu train") if main else contextlib.nullcontext():
            return _run_stage(cfg, out, resume)
    finally:
        if fresh and main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused run leaves no folder behind


def _run_stage(cfg: StageConfig, out: Path, resume: bool | str) -> Path:
    ckpt.restore_interrupted(out / "final")  # an export cut between its two renames: the one before it
    if (out / "final").exists():  # a finished run: continued from its checkpoints, never trained over
        if not ckpt.list_checkpoints(out / "checkpoints"):  # deleted to free the disk, say: --resume would restart
            raise FileExistsError(f"{out} holds a finished run ({out / 'final'}) and no checkpoint to continue it "
                                  "from: use a fresh output_dir (or move final/ away to train again here)")  # fmt: skip
        if resume is False:
            raise FileExistsError(f"{out} holds a finished run ({out / 'final'}): pass --resume to continue it, or "
                                  "use a fresh output_dir")  # fmt: skip
    torch.manual_seed(cfg.train.seed)  # new weights (base, MoE text layers) start the same on every process and run
    task, tokenizer, pipe_cfg = build_task(cfg)
    dataset, collate_fn = cfg.dataset()
    trainer = Trainer(task, dataset, cfg.train, collate_fn=collate_fn,
                      run_config=_run_config(cfg, dataset, pipe_cfg))  # fmt: skip

    def record() -> None:  # once the run is checked: a refused one leaves the folder's record as it was
        if trainer.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "stage_config.yaml").write_text(yaml.safe_dump(_portable(cfg), sort_keys=False))

    trainer.train(resume=resume, on_start=record)
    state = trainer.final_state_dict()  # EMA weights where on; FSDP shards gathered on the main process
    final = out / "final"
    if trainer.accelerator.is_main_process:
        if trainer.fsdp:
            task = build_task(cfg)[0]  # FSDP wrapped the task's blocks in place: a fresh copy takes the weights
        task.load_state_dict(state)
        # minutes of training in all (a resumed run's earlier part included), not of this call
        pipe_cfg.extra = {**pipe_cfg.extra, cfg.stage: {"steps": cfg.train.max_steps, "minutes": round(
            trainer.elapsed / 60, 1), "init_from": cfg.init_from,
            "mixed_precision": trainer.config.mixed_precision}}  # fmt: skip
        prompt_encoder, codec = getattr(task, "export_parts", (task.prompt_encoder, None))
        # written aside and swapped in whole: a kill mid-export must not leave a mixed folder that reads as done
        pipe = UniViGUPipeline(task.transformer, prompt_encoder, tokenizer, pipe_cfg, codec=codec)
        ckpt.write_replacing(final, pipe.save_pretrained, "export")
    trainer.accelerator.wait_for_everyone()  # no process leaves (and tears down the process group) mid-export
    return final


def _run_config(cfg: StageConfig, dataset: Any, pipe_cfg: PipelineConfig) -> dict[str, Any]:
    """What a resumed stage must share with its checkpoints besides the trainer's config: the rest of the stage
    config as it takes effect (defaults and inherited values filled in), but its paths (a run moved to another disk,
    with its inputs, resumes; the weights are the checkpoint's), and a latent cache's rows (its shards and counts:
    the data itself)."""
    run = _plain({k: v for k, v in asdict(cfg).items() if k not in ("train", "init_from")})
    run["data"].pop("path", None)
    run["data"]["kind"] = cfg.data.get("kind", "world")
    if cfg.stage != "base":  # the text flow the task was built with (unset: the previous stage's)
        run["flow"].update(text_source=pipe_cfg.text_source, text_exponent=pipe_cfg.text_exponent)
    if isinstance(dataset, LatentCacheDataset):
        run["data"]["bucket"] = dataset.bucket  # the same shards, in the same order: the same samples per step
        run["cache_rows"] = dataset.index["buckets"][dataset.bucket]
    return run


def _portable(cfg: StageConfig) -> dict[str, Any]:
    """The stage config as saved beside its run, its paths absolute: `univigu train OUT/stage_config.yaml --resume`
    continues this run from any working folder (a relative output_dir would start a new run where it is read)."""
    record = _plain(asdict(cfg))
    record["train"]["output_dir"] = str(Path(cfg.train.output_dir).resolve())
    if cfg.init_from is not None:
        record["init_from"] = str(Path(cfg.init_from).resolve())
    if "path" in cfg.data:
        record["data"]["path"] = str(Path(cfg.data["path"]).resolve())
    return record


def _plain(value: Any) -> Any:
    """Tuples to lists, for YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
