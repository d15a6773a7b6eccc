r"""Few-shot evaluation of Flamingo models in OpenFlamingo's protocol (`vlm_jax.eval.fewshot`).

  python -m vlm_jax.main --mode=eval --config=configs/eval_flamingo.py --workdir=runs/flamingo
  python -m vlm_jax.main --mode=eval --config=configs/eval_flamingo.py:tiny --workdir=/tmp/fl_tiny
  python -m vlm_jax.main --mode=eval --config=configs/eval_flamingo.py:of3b,coco,vqav2 \
    --config.init.checkpoint=conv/of3b --config.data.tokenizer=openflamingo:mpt-1b-redpajama-200b \
    --config.fewshot.tasks.coco.karpathy_json=coco/dataset_coco.json \
    --config.fewshot.tasks.coco.image_dir=coco \
    --config.fewshot.tasks.vqav2.train_questions=vqav2/v2_OpenEnded_mscoco_train2014_questions.json \
    ... --workdir=runs/of3b_eval

The argument is `preset[,task,...]`. The model, data and training fields are those of
`configs/flamingo.py:<preset>` (so `--mode=train` with this file trains the same model, and its
`fewshot` evaluator then runs during training); this file adds `config.fewshot`:

- default, tiny: the synthetic corpus's captioning, VQA and shape-classification tasks (nothing to
  download), and a small `fewshot` evaluator in `config.evals`.
- of3b, of3b_instruct, of4b, of4b_instruct, of9b: OpenFlamingo's eight benchmarks (COCO, Flickr30K,
  VQAv2, OK-VQA, TextVQA, VizWiz, ImageNet, HatefulMemes), 0/4/8/16/32 shots, seeds 42/43/44 (the
  paper's three trials); a task list after the preset keeps only those. Every file path is a required
  field (see `vlm_jax/eval/tasks.py` for what each file holds); an unset one fails naming it.

`config.fewshot` holds every field of `vlm_jax.eval.fewshot.DEFAULTS` (their defaults, but tasks,
shots and trial_seeds): tasks, shots, trial_seeds, query_set_size (2048), num_samples (-1 = whole test
split), batch_size (8), rices (False), rices_vision ("" = the model's own vision tower, else a
converted CLIP dir), rices_projection, num_beams (3), length_penalty (0.0), max_prompt_tokens (2000),
length_bucket, classification_rows, image_cache, num_threads, log_every_sec.
"""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from vlm_jax.config_base import check_preset, load_config
from vlm_jax.eval import fewshot

_FLAMINGO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flamingo.py")
SYNTHETIC_PRESETS = ("default", "tiny")
OF_PRESETS = ("of3b", "of3b_instruct", "of4b", "of4b_instruct", "of9b")

_VQA_FILES = ("train_questions", "train_annotations", "train_image_dir", "test_questions",
              "test_annotations", "test_image_dir")
# Each OpenFlamingo benchmark and the files it reads (all required; vlm_jax/eval/tasks.py).
OF_TASKS = {
  "coco": ("coco", ("karpathy_json", "image_dir")),
  "flickr30k": ("flickr30k", ("karpathy_json", "image_dir")),
  "vqav2": ("vqav2", _VQA_FILES),
  "ok_vqa": ("ok_vqa", _VQA_FILES),
  "textvqa": ("textvqa", _VQA_FILES),
  "vizwiz": ("vizwiz", _VQA_FILES),
  "imagenet": ("imagenet", ("class_names", "train_dir", "test_dir")),
  "hateful_memes": ("hateful_memes", ("image_dir", "train_annotations", "test_annotations")),
}


def _synthetic_tasks(num_train: int, num_test: int) -> dict:
  return {name: {"dataset": name, "num_train": num_train, "num_test": num_test}
          for name in ("synthetic_caption", "synthetic_vqa", "synthetic_classification")}


def _protocol(tasks: dict, **fields) -> ml_collections.ConfigDict:
  """Every field of `fewshot.DEFAULTS` (so each can be set with --config.fewshot.<field>), `fields`
  over them."""
  return ml_collections.ConfigDict({**fewshot.DEFAULTS, "tasks": tasks, **fields})


def _fewshot(preset: str, tasks: list[str]) -> ml_collections.ConfigDict:
  if preset in SYNTHETIC_PRESETS:
    if tasks:
      raise ValueError(f"configs/eval_flamingo.py: preset {preset!r} takes no task list")
    tiny = preset == "tiny"
    return _protocol(_synthetic_tasks(64 if tiny else 512, 8 if tiny else 128),
                     shots=[0, 4] if tiny else [0, 4, 8], trial_seeds=[0, 1] if tiny else [0, 1, 2])
  unknown = sorted(set(tasks) - set(OF_TASKS))
  if unknown:
    raise ValueError(f"configs/eval_flamingo.py: unknown tasks {unknown}; expected some of "
                     f"{sorted(OF_TASKS)}")
  chosen = {}
  for name in tasks or OF_TASKS:
    dataset, files = OF_TASKS[name]
    chosen[name] = {"dataset": dataset, **{f: placeholder(str) for f in files}}
  return _protocol(chosen, shots=[0, 4, 8, 16, 32], trial_seeds=[42, 43, 44])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, *tasks = [p.strip() for p in (arg or "default").split(",")]
  preset = check_preset(preset, SYNTHETIC_PRESETS + OF_PRESETS, "configs/eval_flamingo.py")
  c = load_config(_FLAMINGO, preset)
  c.fewshot = _fewshot(preset, tasks)
  if preset in SYNTHETIC_PRESETS:
    # A light periodic check during training: synthetic VQA, 0 and 4 shots, one seed, greedy.
    tiny = preset == "tiny"
    c.evals.fewshot = ml_collections.ConfigDict(dict(
      type="fewshot", tasks=_synthetic_tasks(64, 8 if tiny else 64), shots=[0, 4], trial_seeds=[0],
      num_beams=1))
  return c
