"""Models: the unified Uni-ViGU transformer and its presets."""

from univigu.models.prompt_encoder import PromptEncoder
from univigu.models.presets import PRESETS, build_model, preset_config
from univigu.models.transformer import UniViGUOutput, UniViGUTransformer, parameter_breakdown

__all__ = ["PRESETS", "PromptEncoder", "UniViGUOutput", "UniViGUTransformer", "build_model", "parameter_breakdown", "preset_config"]
