"""Checkpoint conversion: HF / OpenFlamingo / LLaVA checkpoints <-> vlm_jax params.

Each loader returns `(model, params)` with `model.apply({"params": params}, ...)` reproducing the source
model's outputs. Implemented so far: decoder LMs of the LLaMA family (`load_hf_lm`, `save_hf_lm`), HF CLIP vision
towers (`load_hf_clip_vision`) and LLaVA-1.5 (`load_hf_llava`, `save_hf_llava`),
INF-LLaVA (`load_inf_llava`).
"""

from vlm_jax.convert.hf import load_hf_clip_vision, load_hf_lm, save_hf_lm
from vlm_jax.convert.inf_llava import load_inf_llava
from vlm_jax.convert.llava import load_hf_llava, save_hf_llava
from vlm_jax.convert.openflamingo import load_openflamingo

__all__ = ["load_hf_clip_vision", "load_hf_lm", "load_hf_llava", "load_inf_llava", "load_openflamingo", "save_hf_lm", "save_hf_llava"]
