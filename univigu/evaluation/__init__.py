"""Evaluation in the toy world: the oracle scores videos, the parser scores captions."""

from univigu.evaluation.evaluate import caption_scores, evaluate, prompt_accuracy

__all__ = ["caption_scores", "evaluate", "prompt_accuracy"]
