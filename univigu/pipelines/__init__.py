"""Pipelines: a trained model, its prompt encoder, tokenizer and samplers behind three calls."""

from univigu.pipelines.pipeline import PipelineConfig, PromptError, UniViGUPipeline, UniViGUPipelineOutput

__all__ = ["PipelineConfig", "PromptError", "UniViGUPipeline", "UniViGUPipelineOutput"]
