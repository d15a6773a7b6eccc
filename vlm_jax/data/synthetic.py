"""The embedded synthetic corpus: procedurally drawn coloured shapes with captions and questions.

Every config's default run trains and evaluates on this corpus, so it needs no download, is identical
on every machine, and has answers a small model can learn in minutes (and chance levels we know:
1/4 for shapes, 1/6 for colours).

Each record is a pure function of `(seed, split, kind, index)`: its generator is
`np.random.default_rng([seed, split_id, kind_id, index])`. That gives grain true random access (any
index, any order, any process), and the train and eval splits never draw the same image.

Kinds (see `SyntheticSource`):
  interleaved     MMC4-like documents: optional filler, then 1..max_images `<image>` chunks, each a
                  caption or a question-answer about that image, closed by `<|endofchunk|>`.
  vqa             one image, one question (colour or shape) with a single-word answer.
  pairs           LAION-like image + caption.
  classification  one image + shape label.
  hires           a large image of grey distractors with one tiny coloured target; the question asks
                  the target's colour, which low-resolution encoders cannot see.

`ConversationSource` gives the pairs / vqa / hires records as LLaVA conversation records
(`vlm_jax.data.llava`): stage-1 caption pairs and stage-2 / high-resolution question answering.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlm_jax.data.special_tokens import EOC_TOKEN, EOS_TOKEN, MEDIA_TOKEN

# Saturated, well separated colours; the background and hires distractors are (nearly) grey so the
# target colour is always the only saturated one in an image.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
  "red": (220, 35, 35),
  "green": (40, 185, 60),
  "blue": (40, 80, 235),
  "yellow": (240, 230, 40),
  "purple": (150, 55, 205),
  "orange": (250, 130, 0),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITION_PHRASES: dict[str, str] = {
  "left": "on the left",
  "right": "on the right",
  "top": "at the top",
  "bottom": "at the bottom",
  "center": "in the center",
}
POSITIONS: tuple[str, ...] = tuple(POSITION_PHRASES)

CAPTION_TEMPLATES = (
  "A {size} {colour} {shape} {where}.",
  "There is a {size} {colour} {shape} {where}.",
  "This image shows a {size} {colour} {shape} {where}.",
  "A picture of a {size} {colour} {shape} {where}.",
)
FILLERS = (
  "Here are some pictures.",
  "Look at these images.",
  "Some shapes are shown below.",
  "A few simple drawings.",
  "Let us look at some shapes.",
)
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"
HIRES_QUESTION = "What colour is the small shape?"
# LLaVA-style conversations over the same records (`ConversationSource`): a caption request for
# image-caption pairs (LCS-558K's role) and the roles of the vicuna_v1 template.
DESCRIBE_QUESTION = "Describe the image briefly."
CHAT_ROLES = "USER: ASSISTANT:"
QA_TEMPLATE = "Question: {question} Answer: {answer}"

KINDS = ("interleaved", "vqa", "pairs", "classification", "hires")
SPLITS = ("train", "eval")
# Folded into the seed so kinds and splits draw independent images.
_KIND_IDS = {kind: i for i, kind in enumerate(KINDS)}
_SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}


def _words_of(text: str) -> list[str]:
  # Mirrors the synthetic tokenizer's pre-tokenizer: lowercase words, each punctuation mark alone.
  return re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w+\}", " ", text).lower())


def _all_words() -> tuple[str, ...]:
  texts = [*CAPTION_TEMPLATES, *FILLERS, COLOUR_QUESTION, SHAPE_QUESTION, HIRES_QUESTION,
           DESCRIBE_QUESTION, CHAT_ROLES]
  texts += [QA_TEMPLATE, *COLOURS, *SHAPES, *SIZES, *POSITION_PHRASES.values()]
  return tuple(sorted({w for t in texts for w in _words_of(t)}))


# Every word any template can emit; sorted so the tokenizer's ids never depend on dict order.
WORDS: tuple[str, ...] = _all_words()


def _shape_polygons(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
  """Polygons (one or two) filling `shape` centred at (cx, cy) with half-extent r, in pixels."""
  if shape == "square":
    s = 0.85 * r  # Slightly inset so a square's area is close to the circle's.
    return [[(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]]
  if shape == "triangle":
    return [[(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]]
  if shape == "cross":
    t = r / 3.0
    return [
      [(cx - r, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx - r, cy + t)],
      [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy + r), (cx - t, cy + r)],
    ]
  raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, fill) -> None:
  if shape == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  else:
    for poly in _shape_polygons(shape, cx, cy, r):
      draw.polygon(poly, fill=fill)


def _jittered(rng: np.random.Generator, rgb, amount: int) -> tuple[int, int, int]:
  return tuple(
    int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)
  )


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, int]:
  level = int(rng.integers(25, 90))  # Dark-ish grey: every palette colour stands out against it.
  return Image.new("RGB", (size, size), (level, level, level)), level


def _add_noise(rng: np.random.Generator, image: Image.Image, amount: int = 8) -> np.ndarray:
  # Light per-pixel noise, the same on shape and background, so no pixel is exactly flat.
  arr = np.asarray(image, dtype=np.int16)
  arr = arr + rng.integers(-amount, amount + 1, arr.shape, dtype=np.int16)
  return np.clip(arr, 0, 255).astype(np.uint8)


def render_shape_image(
  rng: np.random.Generator, image_size: int, shape: str, colour: str, size: str, position: str
) -> np.ndarray:
  """Draws one coloured shape on a noisy grey background.

  Returns:
    uint8[image_size, image_size, 3]. The shape spans ~35-42% (small) or ~48-60% (large) of the side.
  """
  s = float(image_size)
  frac = rng.uniform(0.35, 0.42) if size == "small" else rng.uniform(0.48, 0.60)
  r = frac * s / 2
  margin = rng.uniform(0.02, 0.06) * s
  # Start near the centre with jitter; the position word then pins one axis to an edge.
  cx, cy = s / 2 + rng.uniform(-0.06, 0.06, 2) * s
  if position == "left":
    cx = r + margin
  elif position == "right":
    cx = s - r - margin
  elif position == "top":
    cy = r + margin
  elif position == "bottom":
    cy = s - r - margin
  # Keep the whole shape in frame whatever the jitter did.
  cx, cy = float(np.clip(cx, r + 1, s - r - 1)), float(np.clip(cy, r + 1, s - r - 1))
  image, _ = _background(rng, image_size)
  _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, _jittered(rng, COLOUR_RGB[colour], 15))
  return _add_noise(rng, image)


def render_hires_image(
  rng: np.random.Generator, image_size: int, shape: str, colour: str,
  target_frac: tuple[float, float] = (0.02, 0.04),
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """Draws large grey distractors and one small coloured target.

  Returns:
    (uint8[image_size, image_size, 3], target_box) with target_box = (x0, y0, x1, y1) in pixels,
    x1/y1 exclusive, enclosing the target. The target side is a uniform `target_frac` fraction of
    the image side (at least 6 px).
  """
  s = float(image_size)
  image, _ = _background(rng, image_size)
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(4, 8))):
    r = rng.uniform(0.08, 0.18) * s
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    level = int(rng.integers(90, 200))
    # Low saturation (<= 16 per channel apart) so only the target reads as "coloured".
    grey = _jittered(rng, (level, level, level), 8)
    _draw_shape(draw, SHAPES[int(rng.integers(len(SHAPES)))], cx, cy, r, grey)
  side = max(6.0, rng.uniform(*target_frac) * s)
  r = side / 2
  cx, cy = rng.uniform(r + 2, s - r - 2), rng.uniform(r + 2, s - r - 2)
  _draw_shape(draw, shape, cx, cy, r, _jittered(rng, COLOUR_RGB[colour], 10))
  box = (
    max(0, int(np.floor(cx - r)) - 1),
    max(0, int(np.floor(cy - r)) - 1),
    min(image_size, int(np.ceil(cx + r)) + 2),
    min(image_size, int(np.ceil(cy + r)) + 2),
  )
  return _add_noise(rng, image), box


def render_pair_image(
  rng: np.random.Generator, image_size: int, target: tuple[str, str], distractor: tuple[str, str]
) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int, int, int]]:
  """Draws a target and a distractor shape (each `(shape, colour)`) in opposite halves.

  The halves are left/right or top/bottom, and which one holds the target, at random; each shape's
  side is 28-38% of the image side, so the two never overlap.

  Returns:
    (uint8[image_size, image_size, 3], target_box, distractor_box), boxes (x0, y0, x1, y1) in
    pixels, x1/y1 exclusive: the exact extent of each shape's drawn pixels (before the noise).
  """
  s = float(image_size)
  image, _ = _background(rng, image_size)
  draw = ImageDraw.Draw(image)
  vertical = bool(rng.integers(2))  # split into top/bottom halves instead of left/right
  halves = [(0.0, s / 2), (s / 2, s)]
  if rng.integers(2):
    halves.reverse()
  boxes = []
  for (shape, colour), (lo, hi) in zip((target, distractor), halves):
    r = rng.uniform(0.28, 0.38) * s / 2
    along, across = rng.uniform(lo + r + 1, hi - r - 1), rng.uniform(r + 1, s - r - 1)
    cx, cy = (across, along) if vertical else (along, across)
    fill = _jittered(rng, COLOUR_RGB[colour], 15)
    _draw_shape(draw, shape, cx, cy, r, fill)
    # The box from the shape drawn alone, so it is exactly the pixels the shape covers.
    alone = Image.new("L", (image_size, image_size), 0)
    _draw_shape(ImageDraw.Draw(alone), shape, cx, cy, r, 255)
    boxes.append(tuple(int(v) for v in alone.getbbox()))
  return _add_noise(rng, image), boxes[0], boxes[1]


def _caption(rng, shape, colour, size, position) -> str:
  template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
  return template.format(size=size, colour=colour, shape=shape, where=POSITION_PHRASES[position])


def _qa(question: str, answer: str) -> str:
  return QA_TEMPLATE.format(question=question, answer=answer)


class SyntheticSource:
  """Grain random-access source over the synthetic corpus (`__len__`, `__getitem__`).

  Records (images are uint8[H, W, 3], one per `<image>` in `text`, in order):
    interleaved:    {"images", "text", "label"}
    vqa, hires:     {"images", "text", "prompt", "answer", "question_type", "label"}
                    (+ "target_box": (x0, y0, x1, y1) for hires)
    pairs:          {"images", "text", "label"}
    classification: {"images", "text", "label"}
  `label` is the index in SHAPES of the (first / target) shape.
  """

  def __init__(
    self,
    kind: str,
    split: str = "train",
    num_records: int = 100_000,
    image_size: int = 64,
    max_images: int = 3,
    seed: int = 0,
    hires_size: int | None = None,
    hires_target_frac: tuple[float, float] = (0.02, 0.04),
  ):
    if kind not in _KIND_IDS:
      raise ValueError(f"SyntheticSource: unknown kind {kind!r}; expected one of {KINDS}.")
    if split not in _SPLIT_IDS:
      raise ValueError(f"SyntheticSource: unknown split {split!r}; expected one of {SPLITS}.")
    if num_records <= 0:
      raise ValueError(f"SyntheticSource: num_records must be positive, got {num_records}.")
    if image_size < 16:
      raise ValueError(f"SyntheticSource: image_size must be >= 16, got {image_size}.")
    if max_images < 1:
      raise ValueError(f"SyntheticSource: max_images must be >= 1, got {max_images}.")
    if seed < 0:
      raise ValueError(f"SyntheticSource: seed must be >= 0, got {seed}.")
    self.kind, self.split = kind, split
    self.num_records, self.image_size, self.max_images, self.seed = (
      num_records,
      image_size,
      max_images,
      seed,
    )
    self.hires_size = hires_size if hires_size is not None else 6 * image_size
    lo, hi = (float(v) for v in hires_target_frac)
    if not 0 < lo <= hi < 0.5:
      raise ValueError(f"SyntheticSource: hires_target_frac must be 0 < lo <= hi < 0.5, got "
                       f"{hires_target_frac}.")
    self.hires_target_frac = (lo, hi)

  def __len__(self) -> int:
    return self.num_records

  def __repr__(self) -> str:
    return (
      f"SyntheticSource(kind={self.kind!r}, split={self.split!r}, num_records={self.num_records}, "
      f"image_size={self.image_size}, max_images={self.max_images}, seed={self.seed})"
    )

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"SyntheticSource index {index} out of range [0, {self.num_records}).")
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], _KIND_IDS[self.kind], index])
    return getattr(self, f"_make_{self.kind}")(rng)

  def _attributes(self, rng) -> tuple[str, str, str, str]:
    return (
      SHAPES[int(rng.integers(len(SHAPES)))],
      COLOURS[int(rng.integers(len(COLOURS)))],
      SIZES[int(rng.integers(len(SIZES)))],
      POSITIONS[int(rng.integers(len(POSITIONS)))],
    )

  def _image(self, rng, attrs) -> np.ndarray:
    return render_shape_image(rng, self.image_size, *attrs)

  def _make_interleaved(self, rng) -> dict[str, Any]:
    n = int(rng.integers(1, self.max_images + 1))
    parts = [FILLERS[int(rng.integers(len(FILLERS)))]] if rng.random() < 0.5 else []
    images, label = [], None
    for _ in range(n):
      attrs = self._attributes(rng)
      shape, colour = attrs[0], attrs[1]
      label = SHAPES.index(shape) if label is None else label
      images.append(self._image(rng, attrs))
      # 60% question-answer chunks: they carry the few-shot VQA format the eval uses.
      if rng.random() < 0.6:
        body = _qa(COLOUR_QUESTION, colour) if rng.random() < 0.5 else _qa(SHAPE_QUESTION, shape)
      else:
        body = _caption(rng, *attrs)
      parts.append(f"{MEDIA_TOKEN}{body}{EOC_TOKEN}")
    return {"images": images, "text": "".join(parts) + EOS_TOKEN, "label": label}

  def _vqa_record(self, image, question, answer, question_type, label) -> dict[str, Any]:
    prompt = f"{MEDIA_TOKEN}{_qa(question, '').rstrip()}"
    return {
      "images": [image],
      "text": f"{prompt} {answer}{EOC_TOKEN}{EOS_TOKEN}",
      "prompt": prompt,
      "answer": answer,
      "question_type": question_type,
      "label": label,
    }

  def _make_vqa(self, rng) -> dict[str, Any]:
    attrs = self._attributes(rng)
    shape, colour = attrs[0], attrs[1]
    image = self._image(rng, attrs)
    if rng.random() < 0.5:
      return self._vqa_record(image, COLOUR_QUESTION, colour, "colour", SHAPES.index(shape))
    return self._vqa_record(image, SHAPE_QUESTION, shape, "shape", SHAPES.index(shape))

  def _make_pairs(self, rng) -> dict[str, Any]:
    attrs = self._attributes(rng)
    image = self._image(rng, attrs)
    text = f"{MEDIA_TOKEN}{_caption(rng, *attrs)}{EOC_TOKEN}{EOS_TOKEN}"
    return {"images": [image], "text": text, "label": SHAPES.index(attrs[0])}

  def _make_classification(self, rng) -> dict[str, Any]:
    return self._make_pairs(rng)

  def _make_hires(self, rng) -> dict[str, Any]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    image, box = render_hires_image(rng, self.hires_size, shape, colour, self.hires_target_frac)
    record = self._vqa_record(image, HIRES_QUESTION, colour, "colour", SHAPES.index(shape))
    record["target_box"] = box
    return record


class ConversationSource:
  """The corpus as LLaVA conversation records, for `vlm_jax.data.llava.LlavaTransform`:

    {"id", "images": [uint8[H, W, 3]], "conversations": [{"from": "human", "value": "<image>\\n" + q},
                                                         {"from": "gpt", "value": answer}],
     "answer", "question_type", "label" (+ "target_box" for hires)}

  kind "pairs": q = DESCRIBE_QUESTION, the answer is the caption (stage 1); "vqa" / "hires": the
  question and its one-word answer (stage 2 / the high-resolution task).
  """

  KINDS = ("pairs", "vqa", "hires")

  def __init__(self, kind: str, **kwargs):
    if kind not in self.KINDS:
      raise ValueError(f"ConversationSource: kind {kind!r} is not one of {self.KINDS}.")
    self.kind = kind
    self.records = SyntheticSource(kind, max_images=1, **kwargs)

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:
    return f"ConversationSource({self.records!r})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    rec = self.records[index]
    if self.kind == "pairs":
      text = rec["text"].replace(MEDIA_TOKEN, "").replace(EOC_TOKEN, "").replace(EOS_TOKEN, "")
      question, answer, qtype = DESCRIBE_QUESTION, text.strip(), "caption"
    else:
      question = rec["prompt"].replace(MEDIA_TOKEN, "")
      question = question.removeprefix("Question: ").removesuffix(" Answer:").strip()
      answer, qtype = rec["answer"], rec["question_type"]
    out = {"id": f"synthetic:{self.kind}:{self.records.split}:{int(index)}", "images": rec["images"],
           "conversations": [{"from": "human", "value": f"{MEDIA_TOKEN}\n{question}"},
                             {"from": "gpt", "value": answer}],
           "answer": answer, "question_type": qtype, "label": rec["label"]}
    if "target_box" in rec:
      out["target_box"] = rec["target_box"]
    return out
