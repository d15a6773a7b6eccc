r"""Generate text from a Flamingo for one prompt with images (a thin CLI over the `--mode=eval` loading).

  python -m vlm_jax.generate --config=configs/flamingo.py:tiny --checkpoint=runs/fl_tiny \
    --image cat.jpg --prompt "<image>Output:"
  python -m vlm_jax.generate --config=configs/flamingo.py:of3b --checkpoint=conv/of3b \
    --config.data.tokenizer=openflamingo:mpt-1b-redpajama-200b \
    --image a.jpg --image b.jpg --prompt "<image>Output:A cat.<|endofchunk|><image>Output:"

--checkpoint is a converted checkpoint (`python -m vlm_jax.convert ...`) or a training workdir (its
latest checkpoint); without it, `config.init.checkpoint`. The prompt needs one `<image>` per --image,
in order. Decoding defaults are OpenFlamingo's captioning settings (3 beams, length penalty 0, stop at
`<|endofchunk|>`); only the new tokens are decoded, special tokens skipped. The text is printed last.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

def define_flags() -> dict:
  """The CLI's flags (defined only when run as a program, so importing `run` defines none)."""
  return dict(
    config=config_flags.DEFINE_config_file("config", None, "configs/<family>.py[:preset]",
                                           lock_config=True),
    checkpoint=flags.DEFINE_string("checkpoint", None, "converted checkpoint dir or training "
                                   "workdir (default: config.init.checkpoint)"),
    image=flags.DEFINE_multi_string("image", [], "image file, once per <image> in --prompt"),
    prompt=flags.DEFINE_string("prompt", "<image>Output:", "text with one <image> per --image"),
    max_new_tokens=flags.DEFINE_integer("max_new_tokens", 20, "tokens to generate at most"),
    num_beams=flags.DEFINE_integer("num_beams", 3, "beam search width (1 = greedy / sampling)"),
    length_penalty=flags.DEFINE_float("length_penalty", 0.0, "beam score = logp / len**penalty"),
    do_sample=flags.DEFINE_bool("do_sample", False, "sample instead of taking the best tokens"),
    temperature=flags.DEFINE_float("temperature", 1.0, "sampling temperature"),
    top_k=flags.DEFINE_integer("top_k", 0, "sampling: keep the k best tokens (0 = all)"),
    top_p=flags.DEFINE_float("top_p", 1.0, "sampling: nucleus mass"),
    seed=flags.DEFINE_integer("seed", 0, "sampling seed"),
    dtype=flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                            "decode with the weights in this dtype (bfloat16: half the bytes read)"),
  )


def run(config, checkpoint: str | None, images: list[str], prompt: str, dtype: str = "float32",
        **decode) -> str:
  """Loads the model and params, generates after `prompt`; returns the decoded new text."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from vlm_jax.data.images import clip_preprocess, decode_image  # pylint: disable=g-import-not-at-top
  from vlm_jax.data.records import BadRecord  # pylint: disable=g-import-not-at-top
  from vlm_jax.data.special_tokens import MEDIA_TOKEN  # pylint: disable=g-import-not-at-top
  from vlm_jax.data.tokenizer import tokenizer_and_special_ids  # pylint: disable=g-import-not-at-top
  from vlm_jax.eval.generate import cast_for_decoding, generate  # pylint: disable=g-import-not-at-top
  from vlm_jax.eval.inputs import stack_vision  # pylint: disable=g-import-not-at-top
  from vlm_jax.train import restore  # pylint: disable=g-import-not-at-top

  if prompt.count(MEDIA_TOKEN) != len(images):
    raise ValueError(f"--prompt has {prompt.count(MEDIA_TOKEN)} {MEDIA_TOKEN} tokens but "
                     f"{len(images)} --image files were given")
  loaded = restore.load_for_eval(config, checkpoint=checkpoint)
  model, params = loaded.model, loaded.params
  if not hasattr(model, "media_token_id"):
    raise ValueError("vlm_jax.generate runs Flamingo models (config.model_name='flamingo')")
  if dtype != "float32":
    model, params = cast_for_decoding(model, params, dtype)
  size = int(dict(model.vision or {}).get("image_size", 224))
  tok, ids = tokenizer_and_special_ids(config.data.tokenizer)
  pixels = []
  for path in images:
    try:
      pixels.append(clip_preprocess(decode_image(path), size, normalize=False))
    except BadRecord as e:
      raise ValueError(f"--image {path}: {e}") from None
  # At least one image slot: a text-only prompt attends to none (its text_time stays 0).
  vision_x = stack_vision([pixels], max(1, len(pixels)), size)
  input_ids = np.asarray([tok.encode(prompt, add_special_tokens=True).ids], np.int32)
  out = generate(model, params, input_ids, np.ones_like(input_ids),
                 stop_token_ids=(ids["endofchunk"],), pad_token_id=ids["pad"],
                 rng=jax.random.PRNGKey(decode.pop("seed", 0)), mesh=loaded.mesh,
                 rules=loaded.rules, vision_x=vision_x, **decode)
  return tok.decode([int(t) for t in np.asarray(jax.device_get(out))[0]], skip_special_tokens=True)


def main(argv, fl: dict) -> None:
  del argv
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  # Orbax warns about checkpoint items this CLI deliberately leaves unread; the text is the output.
  logging.getLogger().setLevel(logging.ERROR)
  absl_logging.set_verbosity(absl_logging.ERROR)
  if fl["config"].value is None:
    sys.exit("--config is required, e.g. --config=configs/flamingo.py:tiny")
  from vlm_jax import paths  # pylint: disable=g-import-not-at-top

  config = fl["config"].value
  paths.resolve_config(config)
  decode = {k: fl[k].value for k in ("max_new_tokens", "num_beams", "length_penalty", "do_sample",
                                     "temperature", "top_k", "top_p", "seed", "dtype")}
  print(run(config, paths.resolve(fl["checkpoint"].value),
            [paths.resolve(p) for p in fl["image"].value], fl["prompt"].value, **decode))


if __name__ == "__main__":
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
