"""Evaluation: generation with a KV cache (`generate`), OpenFlamingo's few-shot protocol (`fewshot`),
metrics (`metrics`), and the evaluators the trainer runs (`evaluators`)."""

from vlm_jax.eval.generate import cast_for_decoding, generate

__all__ = ["cast_for_decoding", "generate"]
