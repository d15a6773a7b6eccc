"""LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"; HF
`LlavaForConditionalGeneration`).

  images float[N, H, W, 3]
    -> vision (CLIP ViT): Z = hidden_states[vision_feature_layer]       float[N, P, Dv]
       (-2: the output of layer L-1 of L, no LN_post); CLS dropped ("default") or kept ("full")
    -> projector (mlp2x_gelu): H_v = W_2 GELU(W_1 Z + b_1) + b_2         float[N, P, D]
       (paper eq. 1 with LLaVA-1.5's two-layer MLP in place of LLaVA-1's single W)
  input_ids int32[B, T] -> E[input_ids]; the rows where input_ids == image_token_id are replaced,
    in reading order (row-major over B, T), by the N * P rows of H_v
    -> lm (decoder LM) -> logits float32[B, T, V]

Image tokens follow the HF processor: every image is already expanded into a run of P copies of
`image_token_id` in `input_ids` (P = `num_image_tokens`), so the LM sees a sequence as long as
`input_ids`, and position ids are the plain 0..T-1 that both HF's forward and the original
`prepare_inputs_labels_for_multimodal` (right-padded, arange per row) give. The original code marks
an image with id -200 (IMAGE_TOKEN_INDEX), outside the vocabulary; image-token rows are looked up as
id 0 and then overwritten, so any id works, -200 included.

Submodule names are fixed (`vision`, `projector`, `lm`) so freezing/sharding/conversion regexes stay
stable. The vision tower's layers after `vision_feature_layer` and its LN_post still own params (the
checkpoints have them), but their outputs are unused, so XLA drops that compute under jit (not
with `vision.scan_layers`: a scan runs every layer).
`lm.scan_layers` / `vision.scan_layers` and `*.remat_policy` are the towers' own options;
`layer_stacks()` lists the scanned stacks for the converters.

LaViT tower (`vision_family="lavit"`, `vision` = kwargs of `vlm_jax.models.lavit.Model`, its head
dropped): Z = hidden_states[vision_feature_layer] indexes the tower's STAGE outputs
float[N, N_m, D_m] (row-major h_m x w_m tokens, no CLS, nothing dropped), so the default -2 is the
second-to-last stage (4 stages, patch 4: N = (S / 16)^2, 196 tokens of width dims[2] at 224 px) and
-1 the last ((S / 32)^2 = 49).
P = N_m, the projector maps D_m -> D. One int only (stages differ in token count), strategy
"default" only (there is no CLS token for "full" to keep). `inf_llava` / `llava_flex` build their
own ViT and accept "vit" only.

Decoding (`vlm_jax.eval.generate`): with `caches` (from `init_caches`) the LM appends this call's
keys/values and `attention_mask` covers the whole cache; the images go in with the prompt only (the
prefill), the new tokens come with `images=None`, so the vision tower and projector run once.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.mlp import Mlp, activation
from vlm_jax.models import lm_spec, model_class, vision_tower
from vlm_jax.param_paths import LayerStack

Dtype = Any
LM_FAMILIES = ("llama", "llama_flex", "gpt_neox", "mpt")  # decoders whose __call__ takes `embed_hook`
PROJECTOR_TYPES = ("mlp2x_gelu",)
SELECT_STRATEGIES = ("default", "full")


def scatter_image_features(embeds: jax.Array, is_image: jax.Array,
                           features: jax.Array) -> jax.Array:
  """Put the rows of `features` into the image-token rows of `embeds`, in reading order.

  embeds: float[B, T, D]; is_image: bool[B, T]; features: float[M, D] with M = is_image.sum().
  HF's `masked_scatter` as a gather: the k-th image token (k = running count over the flattened
  batch) takes features[k]. Static shapes, so it jits; with M wrong it silently reuses rows, which
  is why `Model` checks the count whenever the inputs are concrete.
  """
  b, t, d = embeds.shape
  flat = is_image.reshape(-1)
  index = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
  gathered = jnp.take(features, index, axis=0).reshape(b, t, d).astype(embeds.dtype)
  return jnp.where(is_image[..., None], gathered, embeds)


class Model(nn.Module):
  """(images, input_ids, attention_mask) -> (logits float32[B, T, V], aux).

  vision: kwargs of `vlm_jax.models.vit.Model` (or `lavit.Model` with vision_family="lavit");
  lm: kwargs of the `lm_family` decoder's `Model`.
  vision_family: "vit" (CLIP ViT) or "lavit" (hierarchical LaViT; see the module docstring).
  vision_feature_layer: index into the ViT's hidden states (0 = embeddings after LN_pre), or a
  sequence of indices whose features are concatenated along channels (HF allows a list); with
  "lavit" one index into the stage outputs.
  """

  vision: Any = None
  vision_family: str = "vit"
  lm: Any = None
  lm_family: str = "llama"
  image_token_id: int = 32000
  vision_feature_layer: int | Sequence[int] = -2
  vision_feature_select_strategy: str = "default"
  projector_type: str = "mlp2x_gelu"
  projector_act: str = "gelu"
  projector_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.lm_family not in LM_FAMILIES:
      raise ValueError(f"model.lm_family {self.lm_family!r} is not one of {LM_FAMILIES}")
    if self.projector_type not in PROJECTOR_TYPES:
      raise ValueError(f"model.projector_type {self.projector_type!r} is not one of "
                       f"{PROJECTOR_TYPES}")
    if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
      raise ValueError(f"model.vision_feature_select_strategy "
                       f"{self.vision_feature_select_strategy!r} is not one of {SELECT_STRATEGIES}")
    activation(self.projector_act)  # fails early, naming the choices
    if self.vision_family != "vit":
      self._check_stage_selection()
    super().__post_init__()

  def _check_stage_selection(self):
    """The tower-dependent field checks of a non-ViT tower (LaViT's stage outputs, no CLS)."""
    tower = self._tower(parent=None)  # an unknown family fails here, naming model.vision_family
    if type(self).__call__ is not Model.__call__:  # a subclass with its own ViT-specific forward
      raise ValueError(f"model.vision_family {self.vision_family!r}: {type(self).__module__} "
                       "supports only 'vit'")
    layer, stages = self.vision_feature_layer, len(tower.dims)
    if not isinstance(layer, int) or not -stages <= layer < stages:
      raise ValueError(f"model.vision_feature_layer {layer!r} must be one stage index in "
                       f"[-{stages}, {stages}) with vision_family 'lavit' (stages differ in token "
                       "count, so their features cannot be concatenated)")
    if self.vision_feature_select_strategy != "default":
      raise ValueError("model.vision_feature_select_strategy must be 'default' with "
                       "vision_family 'lavit': the tower has no CLS token for 'full' to keep")

  @nn.nowrap
  def _tower(self, **module_kw) -> nn.Module:
    """The `vision_family` tower from `vision` (`models.vision_tower`)."""
    return vision_tower(self.vision_family, self.vision, **module_kw)

  @property
  def num_image_tokens(self) -> int:
    """P: the run of image tokens each image occupies in input_ids (576 for CLIP-L/14 at 336; a
    LaViT tower: the selected stage's N_m)."""
    v = self._tower(parent=None)  # parent=None: no submodule made
    if self.vision_family == "lavit":
      return v.num_tokens(self.vision_feature_layer)
    return v.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

  @nn.nowrap
  def layer_stacks(self) -> tuple[LayerStack, ...]:
    """The scanned stacks of this model's param layout (none unless a tower scans its layers)."""
    lm = lm_spec(self.lm_family, self.lm)
    vision = self._tower(parent=None)
    return tuple([s.prefixed("vision/") for s in vision.layer_stacks()]
                 + [s.prefixed("lm/") for s in lm.layer_stacks()])

  @nn.nowrap
  def init_caches(self, batch: int, max_len: int, dtype=None):
    """The LM's empty KV caches for decoding (`llama.Model.init_caches`); dtype defaults to the
    compute dtype."""
    lm = lm_spec(self.lm_family, self.lm)
    return lm.init_caches(batch, max_len, self.dtype if dtype is None else dtype)

  def _select(self, hidden_states: Sequence[jax.Array]) -> jax.Array:
    """ViT hidden states -> float[N, P, Dv'] (HF `get_image_features`, original `feature_select`);
    Dv' = Dv times the number of layers selected. LaViT stage outputs: the selected stage as is."""
    layers = self.vision_feature_layer
    if isinstance(layers, int):
      z = hidden_states[layers]
    else:
      z = jnp.concatenate([hidden_states[i] for i in layers], axis=-1)
    drop_cls = self.vision_family == "vit" and self.vision_feature_select_strategy == "default"
    return z[:, 1:] if drop_cls else z

  @nn.compact
  def __call__(
    self,
    images: jax.Array | None,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    caches: Any = None,
    last_logits_only: bool = False,
  ) -> tuple[jax.Array, dict]:
    """images: float[N, H, W, 3] (NHWC, CLIP-normalised; the batch's images in reading order) or
    None for a text-only batch; input_ids: int32[B, T] holding N * P image tokens;
    attention_mask: int[B, T], or int[B, S_max] over the whole cache with `caches`.
    last_logits_only: logits of the last position only, float32[B, 1, V] (a generation prefill).
    positions: optional int[B, T] LM position ids; caches: the LM's KV caches (`init_caches`),
    updated ones in aux["lm"]["caches"].

    aux: {"image_features": float[N, P, D] (projected), "lm": the LM's aux}.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lm_class = model_class(self.lm_family, "model.lm_family")
    lm = lm_class(name="lm", **kw, **dict(self.lm or {}))
    is_image = input_ids == self.image_token_id
    n_tokens = None if isinstance(is_image, jax.core.Tracer) else int(is_image.sum())
    hook, feats = None, None
    if images is None:
      if n_tokens:
        raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.image_token_id}) but "
                         "no images were given")
    else:
      if images.ndim != 4:
        raise ValueError(f"images must be NHWC float[N, H, W, 3], got shape {images.shape}")
      n_feats = images.shape[0] * self.num_image_tokens
      if n_tokens is not None and n_tokens != n_feats:
        raise ValueError(
          f"input_ids hold {n_tokens} image tokens (id {self.image_token_id}) but "
          f"{images.shape[0]} image(s) give {n_feats} features ({self.num_image_tokens} per "
          "image); expand each image into its run of image tokens as the HF processor does")
      _, vaux = self._tower(name="vision", **kw)(images)
      z = self._select(vaux["hidden_states"])
      z = nn.with_logical_constraint(
        z, ("activation_batch", "activation_length", "activation_embed"))
      # mlp2x_gelu: nn.Sequential(Linear(Dv, D), GELU(), Linear(D, D)), exact-erf GELU (HF: linear_1,
      # ACT2FN[projector_hidden_act], linear_2).
      feats = Mlp(lm.hidden_size, self.projector_act, self.projector_bias, out_dim=lm.hidden_size,
                  name="projector", **kw)(z)

      def hook(x: jax.Array) -> jax.Array:
        return scatter_image_features(x, is_image, feats.reshape(-1, feats.shape[-1]))

    # Image-token ids may lie outside the vocabulary (-200 in the original code); their rows are
    # overwritten by the hook, so look them up as 0. Without images (a decoding step) an image-token
    # id is an ordinary generated token and keeps its own embedding row, as in HF.
    text_ids = input_ids if images is None else jnp.where(is_image, 0, input_ids)
    logits, laux = lm(text_ids, attention_mask, positions, caches, embed_hook=hook,
                      last_logits_only=last_logits_only)
    return logits, {"image_features": feats, "lm": laux}
