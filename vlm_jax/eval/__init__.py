"""Evaluation: generation with a KV cache (`generate`), evaluators run by the trainer."""

from vlm_jax.eval.generate import generate

__all__ = ["generate"]
