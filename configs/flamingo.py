r"""Flamingo (OpenFlamingo semantics): frozen CLIP ViT + Perceiver Resampler + tanh-gated xattn into a
frozen LM.

  python -m vlm_jax.main --config=configs/flamingo.py --workdir=runs/flamingo          # embedded default
  python -m vlm_jax.main --config=configs/flamingo.py:tiny --workdir=/tmp/fl_tiny      # seconds, for tests

Presets (the text after ':'):
- default: the embedded default. Nothing is downloaded: stage 1 trains a tiny LLaMA on the text of the
  synthetic corpus (`<workdir>/lm_pretrain`), stage 2 is the Flamingo stage proper with BOTH towers frozen
  (a randomly initialised ViT and that LM): only the resampler, the xattn blocks and the `<image>` /
  `<|endofchunk|>` embedding rows train. It ends with held-out accuracy on colour/shape questions whose
  answer is only in the image (`eval/accuracy`, >= 0.9 expected) and the same model with every tanh gate
  forced to 0 (`eval/accuracy_gates_off`, near chance) in `<workdir>/results.json`. About 5 minutes on
  2 CPU cores.
- tiny: the same two stages at toy size and a handful of steps (used by the tests).
"""

import ml_collections

from vlm_jax.config_base import base_config, check_preset
from vlm_jax.data import tokenizer as tok

PRESETS = ("default", "tiny")
# Trained in the Flamingo stage: resampler, xattn blocks, and the LM input embedding table, of which the
# gradient row mask keeps only the <image> and <|endofchunk|> rows (OpenFlamingo).
FLAMINGO_TRAINABLE = r"^(resampler|xattn_\d+)/|^lm/embed/embedding$"


def _sizes(preset: str) -> dict:
  if preset == "tiny":
    return dict(image_size=32, patch=8, v_width=32, v_depth=1, v_heads=2, lm_width=32, lm_layers=2,
                lm_heads=2, lm_mlp=64, r_depth=1, r_latents=4, x_heads=2, x_dim_head=16, every=1,
                batch=8, text_len=48, lm_steps=4, fl_steps=6, eval_examples=16, ckpt_every=2)
  # The random frozen ViT keeps shapes readable when each patch embedding is wide enough to hold the
  # patch's pixels (16x16x3 -> 128): measured with a resampler probe, 94% shape accuracy vs 84% for
  # 8x8 patches at width 64.
  return dict(image_size=64, patch=16, v_width=128, v_depth=2, v_heads=4, lm_width=96, lm_layers=4,
              lm_heads=4, lm_mlp=192, r_depth=2, r_latents=8, x_heads=4, x_dim_head=32, every=2,
              batch=32, text_len=48, lm_steps=300, fl_steps=2400, eval_examples=512, ckpt_every=200)


def _data(s: dict, kind: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
    source="synthetic", kind=kind, tokenizer="synthetic", image_size=s["image_size"], max_images=3,
    max_text_len=s["text_len"], num_records=200_000, seed=0, num_threads=2, prefetch_buffer_size=8))


def lm_pretrain_config(s: dict) -> ml_collections.ConfigDict:
  """Stage 1 of the embedded default: a tiny LLaMA trained on the corpus text (images stripped)."""
  c = base_config()
  c.name = "lm_pretrain"
  c.model_name = "llama"
  c.model = ml_collections.ConfigDict(dict(
    vocab_size=tok.synthetic_vocab_size(), hidden_size=s["lm_width"], num_layers=s["lm_layers"],
    num_heads=s["lm_heads"], mlp_dim=s["lm_mlp"], rope_theta=10000.0, tie_embeddings=False))
  c.data = _data(s, "text")
  c.batch_size = s["batch"]
  c.total_steps = s["lm_steps"]
  c.log_every = max(1, min(50, s["lm_steps"] // 4))
  c.optimizer.update(learning_rate=3e-3, schedule="cosine", warmup_steps=min(50, s["lm_steps"] // 4),
                     weight_decay=0.01, weight_decay_regex="kernel$")
  c.checkpoint.every_steps = s["ckpt_every"] * 2
  c.evals = ml_collections.ConfigDict({"heldout": {"type": "loss", "num_batches": 4}})
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = check_preset(arg, PRESETS, "configs/flamingo.py")
  s = _sizes(preset)
  c = base_config()
  c.name = "flamingo"
  c.model_name = "flamingo"
  lm_stage = lm_pretrain_config(s)
  c.model = ml_collections.ConfigDict(dict(
    lm_family="llama",
    lm=lm_stage.model.to_dict(),
    vision=dict(image_size=s["image_size"], patch_size=s["patch"], width=s["v_width"],
                depth=s["v_depth"], heads=s["v_heads"], act="quick_gelu"),
    resampler=dict(depth=s["r_depth"], heads=s["x_heads"], dim_head=s["x_dim_head"],
                   num_latents=s["r_latents"]),
    xattn=dict(heads=s["x_heads"], dim_head=s["x_dim_head"], ff_mult=4),
    cross_attn_every_n_layers=s["every"],
    media_token_id=tok.MEDIA_ID,
    only_attend_immediate_media=True,
    vision_tokens="pre_ln_post",
  ))
  c.trainable = FLAMINGO_TRAINABLE
  c.data = _data(s, "interleaved")
  c.batch_size = s["batch"]
  c.total_steps = s["fl_steps"]
  c.log_every = max(1, min(50, s["fl_steps"] // 4))
  # OpenFlamingo trains at a constant 1e-4 for ~100k steps; this 2400-step run needs 1e-3, and a cosine
  # decay lets it settle (at a constant 1e-3 shape accuracy plateaued near 83% from step 1600 to 2000).
  c.optimizer.update(
    learning_rate=1e-3, schedule="cosine", warmup_steps=min(50, s["fl_steps"] // 4),
    weight_decay=0.1, weight_decay_regex=r"^xattn_\d+/",   # OpenFlamingo: wd on xattn only
    grad_clip_norm=1.0, trainable_rows={"lm/embed/embedding": [tok.MEDIA_ID, tok.EOC_ID]})
  c.checkpoint.every_steps = s["ckpt_every"]
  c.eval_every = s["fl_steps"] // 4 if preset == "default" else 0
  c.evals = ml_collections.ConfigDict({
    "vqa": {"type": "synthetic_vqa", "num_examples": s["eval_examples"]},
    "vqa_gates_off": {"type": "synthetic_vqa", "num_examples": s["eval_examples"],
                      "zero_params": r"^xattn_\d+/(attn_gate|ff_gate)$", "suffix": "_gates_off"},
  })
  c.init.stage = lm_stage
  c.init.stage_prefix = "lm"
  return c
