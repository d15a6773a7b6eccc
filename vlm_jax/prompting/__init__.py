"""Attention Prompting on Image (Yu et al., ECCV 2024): query-guided attribution maps from CLIP or
LLaVA (`api`), their post-processing and overlay on the image (`maps`), and the two-tower CLIP they
need (`clip_model`). The CLI is `python -m vlm_jax.prompt`."""

from vlm_jax.prompting.api import (DEFAULTS, PRESETS, Preset, clip_attribution, clip_scores,
                                   cls_contributions, llava_attribution)
from vlm_jax.prompting.maps import blend, crop_box, mask_for_image, pad_box

__all__ = ["DEFAULTS", "PRESETS", "Preset", "blend", "clip_attribution", "clip_scores",
           "cls_contributions", "crop_box", "llava_attribution", "mask_for_image", "pad_box"]
