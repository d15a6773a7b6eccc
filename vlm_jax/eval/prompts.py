"""Few-shot prompts in OpenFlamingo's exact format (`open_flamingo/eval/evaluate.py` and
`eval/models/open_flamingo.py` of open_flamingo 2.0.1; reference/flamingo.md section 5).

A task's `template` holds the fields of one example and `{answer}`:

  captioning      <image>Output:{answer}                                    (answer = first caption)
  VQA             <image>Question:{question} Short answer:{answer}          (answer = first GT answer)
  ImageNet        <image>Output:{answer}                                    (answer = class name)
  HatefulMemes    <image>is an image with: '{ocr}' written on it. Is it hateful? Answer:{answer}

A demonstration is the template with its answer followed by `<|endofchunk|>`; the query is the template
with an empty answer, so it ends right after "Output:" / "Short answer:" / "Answer:" (no space).
OpenFlamingo joins demonstrations differently per kind, and so do we: captioning and VQA put "\n" after
every demonstration, classification concatenates them with nothing in between.

Zero-shot (Flamingo's trick, OpenFlamingo's `compute_effective_num_shots`): two demonstrations are still
sampled, but their `<image>` tags are removed and their images are not given to the model, so the
model sees the format of the answers in text only.
"""

from __future__ import annotations

import string
from typing import Any, Mapping, Sequence

from vlm_jax.data.special_tokens import EOC_TOKEN, MEDIA_TOKEN

CAPTION_TEMPLATE = "<image>Output:{answer}"
VQA_TEMPLATE = "<image>Question:{question} Short answer:{answer}"
IMAGENET_TEMPLATE = "<image>Output:{answer}"
HATEFUL_MEMES_TEMPLATE = "<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:{answer}"

# OpenFlamingo's separators: evaluate_captioning / evaluate_vqa append "\n" to every demonstration,
# evaluate_classification joins them with "".
GENERATION_SEPARATOR = "\n"
CLASSIFICATION_SEPARATOR = ""

ZERO_SHOT_DEMOS = 2


def effective_num_shots(num_shots: int) -> int:
  """Demonstrations actually sampled: `num_shots`, or 2 text-only ones for zero-shot."""
  if num_shots < 0:
    raise ValueError(f"fewshot.shots must be >= 0, got {num_shots}")
  return num_shots if num_shots > 0 else ZERO_SHOT_DEMOS


def template_fields(template: str) -> tuple[str, ...]:
  """Names of the `{field}`s of a template, `answer` included."""
  return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def check_template(template: str, where: str) -> None:
  """A template must name `{answer}` last-ish and contain exactly one `<image>` (the example's)."""
  fields = template_fields(template)
  if "answer" not in fields:
    raise ValueError(f"{where}: prompt template {template!r} has no {{answer}} field")
  if template.count(MEDIA_TOKEN) != 1:
    raise ValueError(f"{where}: prompt template {template!r} must contain exactly one {MEDIA_TOKEN}")


def render(template: str, fields: Mapping[str, Any], answer: str | None = None) -> str:
  """One example: a demonstration (answer + `<|endofchunk|>`) or, with answer None, the query.

  Equals OpenFlamingo's `get_*_prompt(..., answer)`: `f"...{answer or ''}{EOC if answer else ''}"`.
  """
  text = template.format(**{**fields, "answer": "" if answer is None else answer})
  return text if answer is None else text + EOC_TOKEN


def build_prompt(template: str, demos: Sequence[Mapping[str, Any]], query: Mapping[str, Any],
                 num_shots: int, separator: str) -> str:
  """The whole prompt: demonstrations (each `render`ed with its `answer`, followed by `separator`),
  then the query. With num_shots == 0 the demonstrations (2 of them) lose their `<image>` tags.

  demos: records with the template's fields and "answer"; query: the template's fields.
  """
  context = "".join(render(template, d, d["answer"]) + separator for d in demos)
  if num_shots == 0:
    context = context.replace(MEDIA_TOKEN, "")
  return context + render(template, query)


def num_prompt_images(num_shots: int) -> int:
  """Images given to the model with a prompt: the demonstrations' (none at zero-shot) + the query's.

  OpenFlamingo's classification path keeps the two zero-shot demonstration images although their tags
  are removed, which makes its query token attend to the first demonstration's image (text_time 1);
  we give only the query image, as its captioning / VQA paths do.
  """
  return num_shots + 1
