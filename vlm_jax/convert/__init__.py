"""Checkpoint conversion: HF / OpenFlamingo / LLaVA checkpoints <-> vlm_jax params.

Each loader returns `(model, params)` with `model.apply({"params": params}, ...)` reproducing the source
model's outputs. Implemented so far: decoder LMs of the LLaMA family (`load_hf_lm`, `save_hf_lm`) and HF CLIP vision
towers (`load_hf_clip_vision`).
"""

from vlm_jax.convert.hf import load_hf_clip_vision, load_hf_lm, save_hf_lm

__all__ = ["load_hf_clip_vision", "load_hf_lm", "save_hf_lm"]
