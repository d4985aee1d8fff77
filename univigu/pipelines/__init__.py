"""Pipelines: a trained model, its prompt encoder, tokenizer and samplers behind three calls."""

from univigu.pipelines.pipeline import PipelineConfig, UniViGUPipeline, UniViGUPipelineOutput

__all__ = ["PipelineConfig", "UniViGUPipeline", "UniViGUPipelineOutput"]
