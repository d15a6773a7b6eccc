"""Evaluation: generation with a KV cache (`generate`), OpenFlamingo's few-shot protocol (`fewshot`),
metrics (`metrics`), and the evaluators the trainer runs (`evaluators`)."""

from vlm_jax.eval.generate import generate

__all__ = ["generate"]
