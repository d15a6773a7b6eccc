r"""LLaVA-FlexAttn (Li et al., ECCV'24): LLaVA-1.5 whose later decoder layers attend to a selected
subset of high-resolution tokens (`models.llava_flex`, `models.llama_flex`).

  python -m vlm_jax.main --config=configs/llava_flex.py --workdir=runs/llava_flex   # embedded default
  python -m vlm_jax.main --config=configs/llava.py:hires --workdir=runs/llava_hires  # its baseline

Presets (the text after ':'):
- default: the embedded default. configs/llava.py's stages (tiny LM, stage 1, stage 2, in
  `<workdir>/llava_stage2/...`) give a trained LLaVA-1.5 at the tower's 64 px; this run starts
  from it, as the authors start from LLaVA-1.5-7B (k_hd / v_hd copied from k / v), and fine-tunes
  projector + LM on the synthetic high-resolution task at zoom x 64 = 192 px: a 64 px view into
  the sequence, 3 x 3 crops through the same tower as a 12 x 12 HR grid, selection in 4 x 4
  blocks from layer 1, FlexAttention layers 2..3. Training uses the authors' path (all HR keys,
  every answer row its own selection, the blend ramp over a tenth of the run); the evaluation
  uses the inference path (selection from the prompt's last row). `configs/llava.py:hires` is the
  same run without the HR branch (LLaVA-1.5 at the tower's resolution): same steps, data and
  trainable set.
- tiny: the same at toy size (tests).
- sft: the released LLaVA-FlexAttn recipe (scripts/train/llava-v1.5-7b-flexattn.sh, paper 4.1):
  from LLaVA-1.5-7B (convert liuhaotian/llava-v1.5-7b first), 1008 px images, llava_v1_5_mix665k,
  vicuna_v1, lr 2e-5 cosine, warmup 3%, wd 0, global batch 1152 (paper), one epoch, the whole LM
  (k_hd / v_hd included) and projector train, CLIP frozen; threshold 48, layer 8 selects first:
    python -m vlm_jax.convert llava llava-v1.5-7b --vision clip-vit-large-patch14-336 --out llava7b
    python -m vlm_jax.main --config=configs/llava_flex.py:sft --config.init.checkpoint=llava7b \
      --config.data.tokenizer=llava-v1.5-7b --config.data.path=llava_v1_5_mix665k.json \
      --config.data.image_dir=data --workdir=runs/llava_flex_sft
"""

import os

import ml_collections

from vlm_jax.config_base import check_preset, load_config_module

llava_cfg = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llava.py"))
PRESETS = ("default", "tiny", "sft")
FLEX_7B = dict(flex_start=9, flex_threshold=48.0, flex_blocks=9, hr_grid=72, num_image_tokens=576)


def flex_lm(s: dict) -> dict:
  """The tiny LM with FlexAttention fields: layer flex_start-1 selects first."""
  g = s["image_size"] // s["patch"]
  blocks = 4 if g * s["zoom"] % 4 == 0 else g * s["zoom"]
  return dict(llava_cfg.lm_kwargs(s), flex_start=s["lm_layers"] // 2, flex_threshold=48.0,
              flex_blocks=blocks, flex_budget=None, hr_grid=g * s["zoom"], num_image_tokens=g * g)


def embedded_config(preset: str) -> ml_collections.ConfigDict:
  s = llava_cfg.sizes(preset)
  c = llava_cfg.hires_config(s, name="llava_flex")
  c.model_name = "llava_flex"
  c.model = ml_collections.ConfigDict(dict(
    vision=llava_cfg.vision_kwargs(s), lm=flex_lm(s), image_token_id=c.model.image_token_id,
    zoom=s["zoom"], alpha_ramp_steps=max(1, s["hires_steps"] // 10), dtype="float32"))
  c.data = llava_cfg.synthetic_data(s, "hires", "vicuna_v1", image_size=s["image_size"] * s["zoom"],
                                    answer_rows=True, ori_sizes=True)
  return c


def sft_config() -> ml_collections.ConfigDict:
  c = llava_cfg.recipe_config("stage2")
  c.name = "llava_flex_sft"
  c.model_name = "llava_flex"
  c.model.lm = dict(c.model.lm.to_dict(), **FLEX_7B)
  c.model.zoom = 3
  c.batch_size = 1152
  c.total_steps = 665_298 // 1152
  c.model.alpha_ramp_steps = c.total_steps // 10   # the authors' alpha = min(1, 10 * epoch)
  c.optimizer.update(learning_rate=2e-5, warmup_steps=c.total_steps * 3 // 100)
  c.data.update(image_size=1008, answer_rows=True, ori_sizes=True)
  c.seed = 3407
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = check_preset(arg, PRESETS, "configs/llava_flex.py")
  if preset == "sft":
    return sft_config()
  return embedded_config(preset)
