"""The unified flow: rectified flow for video, discrete (mixture-path) flow for text, their samplers
and the training regimes. Both modalities use the network timestep scale [0, 1000], 1000 = noise."""

from univigu.flow.regimes import (
    JOINT,
    REGIME_NAMES,
    T2V,
    V2T,
    RegimeMix,
    TrainingBatch,
    make_training_batch,
    pad_prompt,
    select_prompt,
    unified_loss,
)
from univigu.flow.samplers import Guidance, SampleOutput, make_generator, sample_t2v, sample_t2vt, sample_v2t
from univigu.flow.text import TextFlow, cut_at_end, text_timestep
from univigu.flow.video import (
    NUM_TRAIN_TIMESTEPS,
    VideoFlow,
    clean_estimate,
    edm_coefficients,
    euler_step,
    guide,
    shift_time,
    time_grid,
    video_timestep,
)

__all__ = [
    "JOINT", "NUM_TRAIN_TIMESTEPS", "REGIME_NAMES", "T2V", "V2T",
    "Guidance", "RegimeMix", "SampleOutput", "TextFlow", "TrainingBatch", "VideoFlow",
    "clean_estimate", "cut_at_end", "edm_coefficients", "euler_step", "guide", "make_generator", "make_training_batch",
    "pad_prompt", "sample_t2v", "sample_t2vt", "sample_v2t", "select_prompt", "shift_time",
    "text_timestep", "time_grid", "unified_loss", "video_timestep",
]  # fmt: skip
