r"""LaViT (Zhang et al., CVPR 2024, "You Only Need Less Attention at Each Stage in Vision
Transformers") trained as an image classifier, next to the ViT of the same widths and depths.

  python -m vlm_jax.main --config=configs/lavit.py --workdir=runs/lavit              # embedded default
  python -m vlm_jax.main --config=configs/lavit.py:deit_imagenet \
    --config.data.tfds_data_dir=~/tensorflow_datasets --workdir=runs/lavit_imagenet

Presets (the text after ':'):
- default: the embedded default; nothing is downloaded. The "tiny" LaViT (`models.lavit.PRESETS`,
  64 px, 4 stages, LA layers in stages 2-4) learns the synthetic shapes task (`data.classification`:
  24 classes = 4 shapes x 6 colours, random size and position, random flips), then the same-width
  all-VA ViT (`lavit.vit_baseline`: no LA layers, no attention residual, no DP loss) trains with
  the same data, steps and recipe in `<workdir>/vit` (`config.baselines`). `<workdir>/results.json`
  holds both side by side: `eval/accuracy` / `eval/num_params` (LaViT) and `vit/eval/accuracy` /
  `vit/eval/num_params`, top-1 on 2048 held-out images. A few minutes on 2 CPU cores.
- deit_imagenet: DeiT's ImageNet-1k recipe (Touvron et al. 2021; reference/lavit_api.md 1.8) for
  the LaViT-S-style model (`lavit_s_style`, a proposal: the paper's variant table was not
  retrieved) at 224 px: AdamW (0.9, 0.999), lr 5e-4 * batch / 512 (batch 1024), wd 0.05 (not on
  biases, norms, the position table, or the LA layers' Theta / Psi, which start as the identity),
  300 epochs, cosine to 1e-5 after 5 warmup epochs, label smoothing 0.1, random resized crop
  (0.08-1, 3/4-4/3, bicubic) + horizontal flip, eval resize 256 -> centre crop 224, no gradient
  clipping; DP loss weight 0.1. NOT implemented: RandAugment (rand-m9-mstd0.5-inc1), Mixup 0.8 /
  CutMix 1.0 (and the soft-target CE they need), random erasing 0.25, repeated augmentation,
  stochastic depth, model EMA; warmup starts from 0, not 1e-6. Data: TFDS `imagenet2012` prepared
  in ArrayRecord format (`tfds build imagenet2012 --file_format=array_record
  --manual_dir=<the ILSVRC2012 tars>`), read from `data.tfds_data_dir`, or an image folder:
    --config.data.source=image_folder --config.data.path.train=/imagenet/train \
    --config.data.path.eval=/imagenet/val          # <split>/<wnid>/*.JPEG
- deit_imagenet_vit: the same recipe for the same-width ViT baseline.
"""

import ml_collections

from vlm_jax.config_base import base_config, check_preset
from vlm_jax.data.classification import SHAPE_CLASSES
from vlm_jax.models import lavit

PRESETS = ("default", "deit_imagenet", "deit_imagenet_vit")
IMAGENET_TRAIN, IMAGENET_CLASSES = 1_281_167, 1000
# Decay matrices only (timm leaves 1-D params and the position table out), and not Theta / Psi:
# decaying them pulls an LA layer's attention transform from the identity towards zero.
WEIGHT_DECAY_REGEX = r"^(?!.*/(theta|psi)/).*kernel$"
_ref = ml_collections.FieldReference


def _classifier(name: str, model: dict, data: dict) -> ml_collections.ConfigDict:
  """The shared part: family lavit, classification CE with smoothing + DP loss, the evals."""
  c = base_config()
  c.name = name
  c.model_name = "lavit"
  c.model = ml_collections.ConfigDict(model)
  c.loss = "classification_ce"
  c.loss_options = ml_collections.ConfigDict(dict(label_smoothing=0.1, dp_weight=0.1))
  c.data = ml_collections.ConfigDict(dict(
    random_resized_crop=ml_collections.config_dict.placeholder(float),
    crop_pct=ml_collections.config_dict.placeholder(float), **data))
  c.evals = ml_collections.ConfigDict({"heldout": {"type": "classification"},
                                       "params": {"type": "param_count"}})
  c.optimizer.update(b1=0.9, b2=0.999, weight_decay=0.05, weight_decay_regex=WEIGHT_DECAY_REGEX,
                     schedule="cosine")
  c.baselines = ml_collections.ConfigDict()
  return c


def shapes_config(name: str, model: dict) -> ml_collections.ConfigDict:
  """The embedded run of `model` on the synthetic shapes task."""
  c = _classifier(name, dict(model, num_classes=len(SHAPE_CLASSES)), dict(
    source="shapes", image_size=model["image_size"], num_records=100_000, seed=0,
    random_flip=0.5, num_threads=2, prefetch_buffer_size=8))
  c.batch_size = 64
  c.total_steps = 600
  c.log_every = 50
  c.checkpoint.every_steps = 200
  # DeiT's 5e-4 * 64 / 512 would barely move in 600 steps; a short run takes a higher peak.
  c.optimizer.update(learning_rate=2e-3, warmup_steps=30, grad_clip_norm=1.0)
  c.evals.heldout.update(num_examples=2048, batch_size=256)
  return c


def deit_config(name: str, model: dict) -> ml_collections.ConfigDict:
  """DeiT's ImageNet recipe (module docstring) for `model`; lr and epochs follow the batch size."""
  c = _classifier(name, dict(model, image_size=224, num_classes=IMAGENET_CLASSES,
                             dtype="bfloat16"), dict(
    source="tfds_classification", tfds_name="imagenet2012",
    tfds_data_dir=ml_collections.config_dict.placeholder(str),
    tfds_splits={"train": "train", "eval": "validation"},
    path={"train": ml_collections.config_dict.placeholder(str),
          "eval": ml_collections.config_dict.placeholder(str)},
    image_size=224, random_flip=0.5, num_threads=16, num_workers=8, prefetch_buffer_size=4))
  c.data.update(random_resized_crop=0.08, crop_pct=0.875)
  c.batch_size = 1024
  epoch = _ref(IMAGENET_TRAIN) // c.get_ref("batch_size")
  c.total_steps = _ref(300 * IMAGENET_TRAIN) // c.get_ref("batch_size")
  c.optimizer.update(learning_rate=_ref(5e-4 / 512) * c.get_ref("batch_size"),
                     warmup_steps=_ref(5 * IMAGENET_TRAIN) // c.get_ref("batch_size"),
                     eps=1e-8, grad_clip_norm=0.0)
  c.optimizer.end_lr_fraction = _ref(1e-5) / c.optimizer.get_ref("learning_rate")  # min_lr 1e-5
  c.eval_every = epoch * 10
  c.log_every = 100
  c.checkpoint.every_steps = epoch
  # 50 batches of 1000 are the whole validation split (a data-parallel size must divide 1000).
  c.evals.heldout.update(batch_size=1000)
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = check_preset(arg, PRESETS, "configs/lavit.py")
  if preset == "deit_imagenet":
    return deit_config("lavit_deit", lavit.PRESETS["lavit_s_style"])
  if preset == "deit_imagenet_vit":
    return deit_config("vit_deit", lavit.vit_baseline("lavit_s_style"))
  c = shapes_config("lavit", lavit.PRESETS["tiny"])
  c.baselines = ml_collections.ConfigDict({"vit": shapes_config("vit",
                                                                lavit.vit_baseline("tiny"))})
  return c
