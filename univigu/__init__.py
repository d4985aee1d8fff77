"""Uni-ViGU: one diffusion transformer for video generation and video understanding.

Public names are imported lazily so that `import univigu` (and the CLI) stays fast; the
heavy dependencies (torch models, diffusers) load on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The shipped toy-world model (a pipeline folder inside the package).
DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "toy-model")
# The shipped stage configs: toy/{base,recall,refine}.yaml, wan/{recall,refine}.yaml.
CONFIGS = Path(__file__).parent / "configs"

# public name -> module that defines it
_EXPORTS = {
    "WorldConfig": "univigu.data.world",
    "World": "univigu.data.world",
    "WorldDataset": "univigu.data.dataset",
    "render_videos": "univigu.data.world",
    "parse_caption": "univigu.data.world",
    "Oracle": "univigu.data.oracle",
    "build_world_tokenizer": "univigu.data.tokenizer",
    "load_tokenizer": "univigu.data.tokenizer",
    "TextCanvas": "univigu.data.tokenizer",
    "read_video": "univigu.data.video_io",
    "write_video": "univigu.data.video_io",
    "VideoReadError": "univigu.data.video_io",
    "UniViGUTransformer": "univigu.models.transformer",
    "PromptEncoder": "univigu.models.prompt_encoder",
    "WanVAECodec": "univigu.models.wan",
    "UMT5PromptEncoder": "univigu.models.wan",
    "ConversionError": "univigu.models.convert",
    "LatentCacheDataset": "univigu.data.latent_cache",
    "UniViGUPipeline": "univigu.pipelines.pipeline",
    "UniViGUPipelineOutput": "univigu.pipelines.pipeline",
    "PipelineConfig": "univigu.pipelines.pipeline",
    "PromptError": "univigu.pipelines.pipeline",
    "PixelCodec": "univigu.data.codec",
    "VideoFlow": "univigu.flow",
    "TextFlow": "univigu.flow",
    "RegimeMix": "univigu.flow",
    "Guidance": "univigu.flow",
    "make_training_batch": "univigu.flow",
    "unified_loss": "univigu.flow",
    "sample_t2v": "univigu.flow",
    "sample_v2t": "univigu.flow",
    "sample_t2vt": "univigu.flow",
    "Trainer": "univigu.training.trainer",
    "TrainerConfig": "univigu.training.trainer",
    "ResumeError": "univigu.training.trainer",
    "StageConfig": "univigu.training.config",
    "load_config": "univigu.training.config",
    "position_sensitivity": "univigu.evaluation.probes",
    "run_stage": "univigu.training.stages",
    "Trajectory": "univigu.viewer",
    "write_trajectory": "univigu.viewer",
}

__all__ = sorted(_EXPORTS) + ["CONFIGS", "DEFAULT_MODEL", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'univigu' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
