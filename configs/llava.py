r"""LLaVA-1.5 training (Liu et al. 2023): frozen CLIP ViT + mlp2x_gelu projector + decoder LM.

  python -m vlm_jax.main --config=configs/llava.py --workdir=runs/llava            # embedded default
  python -m vlm_jax.main --config=configs/llava.py:tiny --workdir=/tmp/llava_tiny  # seconds, for tests

Presets (the text after ':'):
- default: the embedded default; nothing is downloaded. Three stages on the synthetic corpus, each in
  `<workdir>/<stage name>`: `lm_pretrain` (a tiny LLaMA on the corpus text, since a fresh machine has
  no pretrained LM), `llava_stage1` (LLaVA's stage 1: only the projector trains, on caption pairs with
  the `plain` template), then this run, stage 2 (projector + LM, vicuna_v1 conversations, loss on the
  answers only) on colour / shape questions. The vision tower is a random frozen ViT. It ends with
  held-out answer accuracy (`eval/accuracy`) in `<workdir>/results.json`. A few minutes on 2 cores.
- hires: the high-resolution baseline of configs/llava_flex.py and configs/inf_llava.py: the default's
  stage-2 model fine-tuned on the synthetic high-resolution task (a tiny coloured target in a large
  image of grey distractors, downsampled to the tower's resolution, as LLaVA-1.5 at 336 sees a
  1008 px image).
- tiny: default's stages at toy size and a handful of steps (used by the tests).
- stage1, stage2: LLaVA-1.5-7B's recipe (scripts/v1_5/{pretrain,finetune}.sh): CLIP ViT-L/14-336
  (layer -2 patch tokens), Vicuna-7B-v1.5, image_aspect_ratio pad (expand2square with the CLIP
  mean). Stage 1: blip_laion_cc_sbu_558k, plain template, projector only, lr 1e-3, batch 256, wd 0,
  warmup 3%, cosine, 1 epoch. Stage 2: llava_v1_5_mix665k, vicuna_v1, projector + LM, lr 2e-5,
  batch 128, 1 epoch. Convert the parts first (or a whole LLaVA-1.5 for stage 2):
    python -m vlm_jax.convert clip clip-vit-large-patch14-336 --out clip336
    python -m vlm_jax.convert lm vicuna-7b-v1.5 --out vicuna7b
    python -m vlm_jax.main --config=configs/llava.py:stage1 --config.init.checkpoints.vision=clip336 \
      --config.init.checkpoints.lm=vicuna7b --config.data.tokenizer=vicuna-7b-v1.5 \
      --config.data.path=blip_laion_cc_sbu_558k.json --config.data.image_dir=llava_pretrain \
      --workdir=runs/llava_stage1
  Stage 2 starts from stage 1's last checkpoint exported by `vlm_jax.convert` or from a converted
  LLaVA-1.5 (`--config.init.checkpoint=DIR`), with `--config.data.path=llava_v1_5_mix665k.json`.
"""

import ml_collections

from vlm_jax.config_base import base_config, check_preset
from vlm_jax.data import tokenizer as tok

PRESETS = ("default", "hires", "tiny", "stage1", "stage2")
PROJECTOR_ONLY = r"^projector/"
PROJECTOR_AND_LM = r"^(projector|lm)/"

# openai/clip-vit-large-patch14-336 and lmsys/vicuna-7b-v1.5 (32000 tokens; llava-hf adds <image>
# at 32000 and a pad row: 32064 there, but the liuhaotian layout uses 32000 rows and id -200).
VIT_L14_336 = dict(image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096,
                   act="quick_gelu", norm_eps=1e-5)
VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                 mlp_dim=11008, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False)
LLAVA_IMAGE_TOKEN = -200  # liuhaotian's IMAGE_TOKEN_INDEX (outside the vocabulary; models.llava)
TOWER_SCALE = dict(scan_layers=False, remat_policy="none")


def sizes(preset: str) -> dict:
  """The embedded runs' shapes and lengths (shared with llava_flex.py / inf_llava.py)."""
  if preset == "tiny":
    return dict(image_size=32, patch=16, v_width=32, v_depth=1, v_heads=2, lm_width=32, lm_layers=3,
                lm_heads=2, lm_mlp=64, batch=8, text_len=40, lm_steps=4, s1_steps=4, s2_steps=6,
                hires_steps=6, eval_examples=16, ckpt_every=3, zoom=2)
  # The random frozen ViT keeps colours readable when each 16 x 16 patch embedding is wide enough
  # to hold its pixels (the Flamingo default's measurement, configs/flamingo.py).
  return dict(image_size=64, patch=16, v_width=128, v_depth=2, v_heads=4, lm_width=96, lm_layers=4,
              lm_heads=4, lm_mlp=192, batch=32, text_len=48, lm_steps=300, s1_steps=300,
              s2_steps=600, hires_steps=600, eval_examples=512, ckpt_every=200, zoom=3)


# The hires target's side: 8-12% of the 192 px image (15-23 px). In a 64 px crop that is about one
# 16 px patch, which a linear probe on the random tower's features at the target's token reads as
# the right colour 87% of the time; in the 64 px low-resolution view it is 5-8 px, read 63% (at
# 2-4%, the corpus default: 58% and 27%; ridge probe on 1000 images, 500 held out).
HIRES_TARGET_FRAC = (0.08, 0.12)


def synthetic_data(s: dict, kind: str, template: str, image_size: int | None = None,
                   **extra) -> ml_collections.ConfigDict:
  """The synthetic corpus as LLaVA conversations; the synthetic tokenizer has no <s> / </s>, so the
  answers close with <|endoftext|> and there is no BOS or system prompt."""
  size = image_size or s["image_size"]
  p = (s["image_size"] // s["patch"]) ** 2
  return ml_collections.ConfigDict(dict(
    source="synthetic", kind=kind, template=template, tokenizer="synthetic", image_size=size,
    hires_size=s["image_size"] * s["zoom"], num_image_tokens=p, max_text_len=s["text_len"],
    system="", bos_token="", eos_token=tok.EOS_TOKEN, pad_token=tok.PAD_TOKEN,
    hires_target_frac=HIRES_TARGET_FRAC, num_records=200_000, seed=0, num_threads=2,
    prefetch_buffer_size=8, **extra))


def lm_pretrain_config(s: dict) -> ml_collections.ConfigDict:
  """Stage 0 of the embedded default: a tiny LLaMA on the corpus text (as configs/flamingo.py)."""
  c = base_config()
  c.name = "lm_pretrain"
  c.model_name = "llama"
  c.model = ml_collections.ConfigDict(dict(lm_kwargs(s), dtype="float32"))
  c.data = ml_collections.ConfigDict(dict(
    source="synthetic", kind="text", tokenizer="synthetic", image_size=s["image_size"],
    max_images=3, max_text_len=s["text_len"], num_records=200_000, seed=0, num_threads=2,
    prefetch_buffer_size=8))
  _schedule(c, s, s["lm_steps"], 3e-3, weight_decay=0.01)
  c.evals = ml_collections.ConfigDict({"heldout": {"type": "loss", "num_batches": 4}})
  return c


def lm_kwargs(s: dict) -> dict:
  return dict(vocab_size=tok.synthetic_vocab_size(), hidden_size=s["lm_width"],
              num_layers=s["lm_layers"], num_heads=s["lm_heads"], mlp_dim=s["lm_mlp"],
              rope_theta=10000.0, tie_embeddings=False, **TOWER_SCALE)


def vision_kwargs(s: dict) -> dict:
  return dict(image_size=s["image_size"], patch_size=s["patch"], width=s["v_width"],
              depth=s["v_depth"], heads=s["v_heads"], act="quick_gelu", **TOWER_SCALE)


def _schedule(c, s: dict, steps: int, lr: float, weight_decay: float = 0.0) -> None:
  """LLaVA's schedule shape: cosine with a 3% warmup (at least a few steps)."""
  c.batch_size = s["batch"]
  c.total_steps = steps
  c.log_every = max(1, min(50, steps // 4))
  c.optimizer.update(learning_rate=lr, schedule="cosine", warmup_steps=max(1, steps * 3 // 100),
                     weight_decay=weight_decay, grad_clip_norm=1.0)
  c.checkpoint.every_steps = s["ckpt_every"]


def vqa_evals(s: dict, kind: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"vqa": {"type": "llava_vqa", "kind": kind,
                                            "num_examples": s["eval_examples"]}})


def stage1_config(s: dict) -> ml_collections.ConfigDict:
  """LLaVA stage 1 on the corpus: the projector learns to caption (plain template)."""
  c = base_config()
  c.name = "llava_stage1"
  c.model_name = "llava"
  c.model = ml_collections.ConfigDict(dict(vision=vision_kwargs(s), lm=lm_kwargs(s),
                                           image_token_id=tok.MEDIA_ID, dtype="float32"))
  c.trainable = PROJECTOR_ONLY
  c.data = synthetic_data(s, "pairs", "plain")
  _schedule(c, s, s["s1_steps"], 1e-3)   # LLaVA stage 1: lr 1e-3, wd 0
  c.evals = ml_collections.ConfigDict({"heldout": {"type": "loss", "num_batches": 4}})
  c.init.stage = lm_pretrain_config(s)
  c.init.stage_prefix = "lm"
  return c


def stage2_config(s: dict) -> ml_collections.ConfigDict:
  """LLaVA stage 2 on the corpus: projector + LM on colour / shape questions (vicuna_v1)."""
  c = stage1_config(s)
  c.name = "llava_stage2"
  c.trainable = PROJECTOR_AND_LM
  c.data = synthetic_data(s, "vqa", "vicuna_v1")
  # LLaVA's 2e-5 is for a pretrained 7B LM; this tiny LM learns the chat format from scratch.
  _schedule(c, s, s["s2_steps"], 1e-3)
  c.evals = vqa_evals(s, "vqa")
  c.init.stage = stage1_config(s)
  c.init.stage_prefix = ""
  return c


def hires_config(s: dict, name: str = "llava_hires") -> ml_collections.ConfigDict:
  """Stage 2's model fine-tuned on the high-resolution task at the tower's resolution (the
  baseline: the same steps, data and trainable set as the high-resolution models)."""
  c = stage2_config(s)
  c.name = name
  c.data = synthetic_data(s, "hires", "vicuna_v1")
  _schedule(c, s, s["hires_steps"], 5e-4)
  c.evals = vqa_evals(s, "hires")
  c.init.stage = stage2_config(s)
  c.init.stage_prefix = ""
  return c


def recipe_config(preset: str) -> ml_collections.ConfigDict:
  """LLaVA-1.5-7B, stage 1 or 2 (see the module docstring)."""
  c = base_config()
  c.name = f"llava_{preset}"
  c.model_name = "llava"
  c.model = ml_collections.ConfigDict(dict(
    vision=dict(VIT_L14_336, **TOWER_SCALE), lm=dict(VICUNA_7B, **TOWER_SCALE),
    image_token_id=LLAVA_IMAGE_TOKEN, dtype="bfloat16"))
  stage1 = preset == "stage1"
  records, batch = (558_128, 256) if stage1 else (665_298, 128)
  c.trainable = PROJECTOR_ONLY if stage1 else PROJECTOR_AND_LM
  c.data = ml_collections.ConfigDict(dict(
    source="llava", template="plain" if stage1 else "vicuna_v1", image_size=336,
    image_token_id=LLAVA_IMAGE_TOKEN,
    num_image_tokens=576, max_text_len=2048, num_threads=16, prefetch_buffer_size=4,
    tokenizer=ml_collections.config_dict.placeholder(str),
    path=ml_collections.config_dict.placeholder(str),
    image_dir=ml_collections.config_dict.placeholder(str)))
  if stage1:
    c.data.eos_token = "\n"   # preprocess_plain: "<image>{caption}\n"
  c.batch_size = batch
  c.total_steps = records // batch  # one epoch
  c.optimizer.update(learning_rate=1e-3 if stage1 else 2e-5, schedule="cosine",
                     warmup_steps=c.total_steps * 3 // 100, weight_decay=0.0, grad_clip_norm=1.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.every_steps = 500
  c.log_every = 20
  c.evals = ml_collections.ConfigDict()
  c.frozen_param_dtype = "bfloat16"
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = check_preset(arg, PRESETS, "configs/llava.py")
  if preset in ("stage1", "stage2"):
    return recipe_config(preset)
  s = sizes("tiny" if preset == "tiny" else "default")
  if preset == "hires":
    return hires_config(s)
  c = stage2_config(s)
  c.name = "llava"
  return c
