r"""INF-LLaVA (Lin et al. 2024): LLaVA-1.5 whose 576 image tokens come from a 1008 px image through
the dual-crop module and the dual-perspective enhancement module (`models.inf_llava`).

  python -m vlm_jax.main --config=configs/inf_llava.py --workdir=runs/inf_llava       # embedded default
  python -m vlm_jax.main --config=configs/llava.py:hires --workdir=runs/llava_hires   # its baseline

Presets (the text after ':'):
- default: the embedded default. configs/llava.py's stages (tiny LM, stage 1, stage 2, in
  `<workdir>/llava_stage2/...`) give a trained LLaVA-1.5 at the tower's 64 px; this run starts
  from it and fine-tunes projector + LM + the new DEM (`spatial_embed`, random init: the authors
  train it from scratch in their stage 1) on the synthetic high-resolution task at 3 x 64 = 192 px:
  3 x 3 local crops and 3 x 3 strided crops through the same tower, the DEM, the mean with the
  resized view, 16 image tokens into the LM, as many as LLaVA-1.5 at 64 px gets.
  `configs/llava.py:hires` is the same run without the high-resolution views: same steps, data,
  image-token count and trainable set (less the DEM, which it does not have).
- tiny: the same at toy size (tests).
- stage1, stage2: the authors' recipe (scripts of WeihuangLin/INF-LLaVA; reference/flex_inf.md
  2.5): CLIP ViT-L/14-336, 1008 px (n = 3), 576 tokens. Stage 1: blip_laion_cc_sbu_558k, plain
  template, projector + spatial_embed train (everything else frozen), lr 1e-3, batch 256, cosine,
  warmup 3%, 1 epoch. Stage 2: llava_v1_5_mix665k with the llama3 template (the released model is
  LLaMA-3-8B based), projector + spatial_embed + LM, lr 2e-5, batch 128, 1 epoch. Convert the
  parts first, then stage 2 starts from stage 1's checkpoint:
    python -m vlm_jax.convert clip clip-vit-large-patch14-336 --out clip336
    python -m vlm_jax.convert lm Meta-Llama-3-8B-Instruct --out llama3_8b
    python -m vlm_jax.main --config=configs/inf_llava.py:stage1 \
      --config.init.checkpoints.vision=clip336 --config.init.checkpoints.lm=llama3_8b \
      --config.data.tokenizer=Meta-Llama-3-8B-Instruct \
      --config.data.path=blip_laion_cc_sbu_558k.json --config.data.image_dir=llava_pretrain \
      --workdir=runs/inf_llava_stage1
  The released checkpoint converts with `python -m vlm_jax.convert inf-llava INF-LLaVA --out inf`
  (use it with `--config.init.checkpoint=inf`).
"""

import os

import ml_collections

from vlm_jax.config_base import check_preset, load_config_module

llava_cfg = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llava.py"))
PRESETS = ("default", "tiny", "stage1", "stage2")
# The DEM trains with the projector from stage 1 on (the authors force spatial_embed trainable).
DEM_AND_PROJECTOR = r"^(projector|spatial_embed)/"
DEM_PROJECTOR_AND_LM = r"^(projector|spatial_embed|lm)/"
# LLaMA-3-8B (the released INF-LLaVA's LM; vocabulary 128256 + the <pad> the authors add).
LLAMA3_8B = dict(vocab_size=128257, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 mlp_dim=14336, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False)


def dem_kwargs(width: int) -> dict:
  """The authors' DEM: 8 heads (16 at toy widths would not divide), bottleneck = width / 4."""
  heads = 8 if width % 8 == 0 else 2
  return dict(num_heads=heads, bottleneck_div=4)


def embedded_config(preset: str) -> ml_collections.ConfigDict:
  s = llava_cfg.sizes(preset)
  c = llava_cfg.hires_config(s, name="inf_llava")
  c.model_name = "inf_llava"
  c.model = ml_collections.ConfigDict(dict(
    vision=llava_cfg.vision_kwargs(s), lm=llava_cfg.lm_kwargs(s),
    image_token_id=c.model.image_token_id, num_crops=s["zoom"], dem=dem_kwargs(s["v_width"]),
    dtype="float32"))
  c.trainable = DEM_PROJECTOR_AND_LM
  c.data = llava_cfg.synthetic_data(s, "hires", "vicuna_v1", image_size=s["image_size"] * s["zoom"])
  return c


def recipe_config(preset: str) -> ml_collections.ConfigDict:
  c = llava_cfg.recipe_config(preset)
  c.name = f"inf_llava_{preset}"
  c.model_name = "inf_llava"
  c.model.lm = dict(LLAMA3_8B, **llava_cfg.TOWER_SCALE)
  c.model.num_crops = 3
  c.model.dem = dem_kwargs(1024)
  c.data.image_size = 1008
  stage1 = preset == "stage1"
  c.trainable = DEM_AND_PROJECTOR if stage1 else DEM_PROJECTOR_AND_LM
  if not stage1:  # conv_llama3: the template writes <|begin_of_text|> itself, answers end <|eot_id|>
    c.data.update(template="llama3", bos_token=None, eos_token="<|eot_id|>")
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = check_preset(arg, PRESETS, "configs/inf_llava.py")
  if preset in ("stage1", "stage2"):
    return recipe_config(preset)
  return embedded_config(preset)
