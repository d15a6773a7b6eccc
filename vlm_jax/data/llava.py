"""LLaVA-1.5 conversation records -> inputs of `vlm_jax.models.llava.Model` (reference/flex_inf.md
sections 3.3-3.5).

Record (from `formats.llava_json`): {"id", "images": [one image] or [], "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}.

Text, vicuna_v1 (`conv_vicuna_v1`, sep " ", sep2 "</s>"), for turns (q1, a1), (q2, a2):

  <s>{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

  * like LLaVA's `preprocess_multimodal`, `<image>` is taken out of the text and put, with "\\n",
    at the front of the first human turn (an image entry whose text lacks `<image>` gets it there
    too, so the image is never silently unused; a text-only entry whose text has one is dropped as
    "image_count_mismatch": its question is about a picture nobody will see);
  * like `tokenizer_image_token`, the text on either side of `<image>` is tokenized separately
    (no special tokens added) after one BOS, and the image becomes a run of `num_image_tokens`
    copies of `image_token_id` (the HF processor's expansion, which `models.llava` consumes).

Labels (`preprocess_v1`'s mask, computed differently): IGNORE (-100) on BOS, the system prompt,
every "USER: ... ASSISTANT:" instruction, the image run and padding; kept on each answer and its
closing "</s>". Instead of re-tokenizing rounds and subtracting lengths (which is what goes wrong in
LLaVA's "WARNING: tokenization mismatch", zeroing the whole sample's loss), the renderer records the
character span of every answer, and a token is trained iff its own character offsets (from the same
encoding that produced `input_ids`) overlap one. The spans and the ids come from one tokenization,
so they cannot disagree, whatever the tokenizer's spacing rules.

Image (LLaVA-1.5 `image_aspect_ratio="pad"`): `decode_image`, `expand2square` with the CLIP mean
colour (122, 116, 104), bicubic resize of the shortest side to `image_size`, centre crop, CLIP
normalisation. Alpha is composited on white (`decode_image`'s house rule), where LLaVA's
`convert("RGB")` drops it.

Output of `LlavaTransform`: {"images": float32[1, S, S, 3] (zeros for a text-only sample),
"image_mask": bool[1] (False for a text-only sample), "input_ids", "attention_mask", "labels":
int32[max_text_len] each, right-padded}. `collate` batches them for the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tokenizers

from vlm_jax.data import images as images_lib
from vlm_jax.data.interleaved import IGNORE_INDEX, pad_tokens
from vlm_jax.data.records import BadRecord
from vlm_jax.data.special_tokens import MEDIA_TOKEN as IMAGE_TOKEN
VICUNA_V1_SYSTEM = (
  "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
  "helpful, detailed, and polite answers to the user's questions.")
USER, ASSISTANT = "USER", "ASSISTANT"


def expand2square(image: np.ndarray, fill: Sequence[int]) -> np.ndarray:
  """LLaVA's `expand2square`: uint8[H, W, 3] centred on a max(H, W) square of colour `fill`.

  The offset is (long - short) // 2, as in LLaVA's `paste` call.
  """
  h, w = image.shape[:2]
  if h == w:
    return image
  side = max(h, w)
  out = np.empty((side, side, 3), np.uint8)
  out[...] = np.asarray(fill, np.uint8)
  top, left = (side - h) // 2, (side - w) // 2
  out[top:top + h, left:left + w] = image
  return out


def preprocess_image(
  image_uint8: np.ndarray,
  size: int,
  *,
  pad_to_square: bool = True,
  mean: Sequence[float] = images_lib.CLIP_MEAN,
  std: Sequence[float] = images_lib.CLIP_STD,
) -> np.ndarray:
  """LLaVA-1.5's image path: uint8[H, W, 3] -> float32[size, size, 3], CLIP-normalised."""
  if pad_to_square:
    # int(x * 255), not round: LLaVA's fill is (122, 116, 104).
    image_uint8 = expand2square(image_uint8, tuple(int(m * 255) for m in mean))
  return images_lib.clip_preprocess(image_uint8, size, mean, std)


def conversation_pairs(conversations: Sequence[dict], where: str) -> list[tuple[str, str]]:
  """[(question, answer)] from alternating human/gpt turns.

  A leading gpt turn is dropped, as LLaVA's `preprocess` does. Raises BadRecord "malformed_json"
  (turns that do not alternate, or a final unanswered question) or "text_empty" (no turns, or a
  blank one).
  """
  turns = list(conversations)
  if turns and turns[0].get("from") == "gpt":
    turns = turns[1:]
  if not turns:
    raise BadRecord("text_empty", f"{where}: no human turn")
  for k, turn in enumerate(turns):
    expected = "human" if k % 2 == 0 else "gpt"
    if turn.get("from") != expected:
      raise BadRecord("malformed_json", f"{where}: turn {k} is from {turn.get('from')!r}, expected "
                                        f"{expected!r} (turns must alternate human, gpt)")
    value = turn.get("value")
    if not isinstance(value, str) or not value.replace(IMAGE_TOKEN, "").strip():
      raise BadRecord("text_empty", f"{where}: turn {k} ({expected}) is blank")
  if len(turns) % 2:
    raise BadRecord("malformed_json", f"{where}: the last human turn has no answer")
  return [(turns[k]["value"], turns[k + 1]["value"]) for k in range(0, len(turns), 2)]


def _place_image(pairs: list[tuple[str, str]], has_image: bool, where: str):
  """`<image>` removed from every turn; with an image, "<image>\\n" fronts the first question."""
  if not has_image:
    if any(IMAGE_TOKEN in q or IMAGE_TOKEN in a for q, a in pairs):
      raise BadRecord("image_count_mismatch", f"{where}: text has {IMAGE_TOKEN} but the entry has "
                                              "no image")
    return pairs

  def clean(text: str) -> str:
    # Only turns that held the marker are stripped, as in LLaVA's preprocess_multimodal.
    return text.replace(IMAGE_TOKEN, "").strip() if IMAGE_TOKEN in text else text

  pairs = [(clean(q), clean(a)) for q, a in pairs]
  q0, a0 = pairs[0]
  return [(f"{IMAGE_TOKEN}\n{q0}", a0)] + pairs[1:]


def _render(head: str, turns: Sequence[tuple[str, str, str]]) -> tuple[str, list[tuple[int, int]]]:
  """head + instruction_1 + answer_1 + ... and the [start, end) span of every answer (its closing
  separator included): the one place the character spans are counted."""
  parts, spans, length = [head], [], len(head)
  for instruction, answer, close in turns:
    parts += [instruction, answer, close]
    length += len(instruction)
    spans.append((length, length + len(answer) + len(close)))
    length = spans[-1][1]
  return "".join(parts), spans


def render_vicuna_v1(
  pairs: Sequence[tuple[str, str]], *, system: str = VICUNA_V1_SYSTEM, eos: str = "</s>"
) -> tuple[str, list[tuple[int, int]]]:
  """The vicuna_v1 prompt (without BOS) and the [start, end) character span of each answer + eos.

  "{system} USER: {q1} ASSISTANT: {a1}{eos}USER: {q2} ASSISTANT: {a2}{eos}" (sep " ", sep2 eos).
  """
  return _render(f"{system} ", [(f"{USER}: {q} {ASSISTANT}: ", a, eos) for q, a in pairs])


LLAMA3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"


def render_llama3(
  pairs: Sequence[tuple[str, str]], *, system: str = VICUNA_V1_SYSTEM, eos: str = "<|eot_id|>"
) -> tuple[str, list[tuple[int, int]]]:
  """INF-LLaVA's `conv_llama3` (sep_style MPT, sep "<|eot_id|>"), BOS included as text:

  "<|begin_of_text|>{H(system)}{system}{eos}{H(user)}{q1}{eos}{H(assistant)}{a1}{eos}..." with
  H(role) = "<|start_header_id|>{role}<|end_header_id|>\n\n"; each answer's span covers its eos.
  """
  head = f"<|begin_of_text|>{LLAMA3_HEADER.format(role='system')}{system}{eos}"
  return _render(head, [(f"{LLAMA3_HEADER.format(role='user')}{q}{eos}"
                         f"{LLAMA3_HEADER.format(role='assistant')}", a, eos) for q, a in pairs])


def render_plain(
  pairs: Sequence[tuple[str, str]], *, system: str = "", eos: str = "\n"
) -> tuple[str, list[tuple[int, int]]]:
  """LLaVA's stage-1 `plain` template (`preprocess_plain`): "<image>{caption}\n"; the question
  text is dropped (LLaVA replaces the whole human turn by the image) and only the first pair
  is used. The caption and its "\n" are trained."""
  del system  # plain has none
  question, answer = pairs[0]
  return _render("", [(IMAGE_TOKEN if IMAGE_TOKEN in question else "", answer, eos)])


TEMPLATES = {"vicuna_v1": render_vicuna_v1, "llama3": render_llama3, "plain": render_plain}


class LlavaTransform(grain.transforms.Map):
  """LLaVA conversation record -> {"images", "image_mask", "input_ids", "attention_mask", "labels"}
  (layout and rules in the module docstring).

  Args:
    tokenizer: the LM's tokenizer; `eos_token` must encode as one token.
    max_text_len: T, including the image run. Longer samples are cut after the image run; a sample
      whose image run would not fit is dropped ("no_image"), one left with no answer token is
      dropped ("no_target_tokens").
    image_size: S.
    num_image_tokens: P, the image run length (`models.llava.Model.num_image_tokens`; 576 for
      CLIP-L/14 at 336).
    image_token_id: id of the image-run tokens (the model's `image_token_id`); default: the
      tokenizer's id of "<image>" (32000 in llava-hf). Original LLaVA checkpoints with a plain
      vicuna tokenizer use -200, which the model accepts.
    template: "vicuna_v1" (LLaVA-1.5 SFT), "llama3" (INF-LLaVA SFT: `bos_token=None`, the
      template writes <|begin_of_text|>; eos "<|eot_id|>") or "plain" (stage-1 captions).
    system: the system prompt.
    bos_token: prepended once (None: no BOS, for LMs without one).
    eos_token: the template's answer separator (vicuna_v1's sep2), closing every answer; must be
      one token (for "plain" give the tokenizer's newline token or its EOS).
    pad_token: default "<pad>" if the tokenizer has it, else "<unk>" (what LLaVA pads vicuna with).
    pad_to_square: LLaVA-1.5's `image_aspect_ratio="pad"`; False for plain resize + centre crop.
    min_image_side, max_image_pixels: forwarded to `images.decode_image`.
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    *,
    max_text_len: int,
    image_size: int,
    num_image_tokens: int,
    image_token_id: int | None = None,
    template: str = "vicuna_v1",
    system: str = VICUNA_V1_SYSTEM,
    bos_token: str | None = "<s>",
    eos_token: str = "</s>",
    pad_token: str | None = None,
    pad_to_square: bool = True,
    min_image_side: int = images_lib.DEFAULT_MIN_SIDE,
    max_image_pixels: int | None = images_lib.DEFAULT_MAX_PIXELS,
  ):
    if template not in TEMPLATES:
      raise ValueError(f"template {template!r} is not one of {tuple(TEMPLATES)}")
    self.render = TEMPLATES[template]
    if max_text_len < 1 or num_image_tokens < 1 or image_size < 1:
      raise ValueError(f"max_text_len={max_text_len}, num_image_tokens={num_image_tokens} and "
                       f"image_size={image_size} must be >= 1.")
    if tokenizer.truncation is not None or tokenizer.padding is not None:
      # A tokenizer.json may switch these on; they would cut or pad each chunk behind our back.
      tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
      tokenizer.no_truncation()
      tokenizer.no_padding()
    self.tokenizer = tokenizer
    self.max_text_len, self.image_size, self.num_image_tokens = (
      max_text_len, image_size, num_image_tokens)
    self.system, self.eos_token, self.pad_to_square = system, eos_token, pad_to_square
    self.image_checks = dict(min_side=min_image_side, max_pixels=max_image_pixels)
    if image_token_id is None:
      image_token_id = self._token_id(IMAGE_TOKEN, "image_token_id")
    self.image_token_id = int(image_token_id)
    self.bos_id = None if bos_token is None else self._token_id(bos_token, "bos_token")
    eos_id = self._token_id(eos_token, "eos_token")
    if tokenizer.encode(eos_token, add_special_tokens=False).ids != [eos_id]:
      raise ValueError(f"eos_token {eos_token!r} does not encode as the single token {eos_id}; add "
                       "it to the tokenizer as a special token.")
    if pad_token is None:
      pad_token = "<pad>" if tokenizer.token_to_id("<pad>") is not None else "<unk>"
    self.pad_id = self._token_id(pad_token, "pad_token")

  def _token_id(self, token: str, arg: str) -> int:
    token_id = self.tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f"The tokenizer has no token {token!r}; pass {arg}= for this tokenizer.")
    return int(token_id)

  def _encode(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(int32[n] ids, bool[n] trained); a token is trained iff its offsets overlap a span."""
    enc = self.tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    trained = np.zeros(len(ids), bool)
    for start, end in spans:
      trained |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    return ids, trained

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    where = str(element.get("id", "record"))
    record_images = list(element.get("images") or [])
    if len(record_images) > 1:
      raise BadRecord("image_count_mismatch", f"{where}: {len(record_images)} images; LLaVA-1.5 "
                                              "samples have at most one")
    has_image = bool(record_images)
    pairs = _place_image(conversation_pairs(element["conversations"], where), has_image, where)
    text, spans = self.render(pairs, system=self.system, eos=self.eos_token)

    head_ids = [] if self.bos_id is None else [self.bos_id]
    pieces = [(np.asarray(head_ids, np.int32), np.zeros(len(head_ids), bool))]
    if has_image:
      cut = text.index(IMAGE_TOKEN)
      after = cut + len(IMAGE_TOKEN)
      pieces.append(self._encode(text[:cut], [s for s in spans if s[1] <= cut]))
      pieces.append((np.full(self.num_image_tokens, self.image_token_id, np.int32),
                     np.zeros(self.num_image_tokens, bool)))
      pieces.append(self._encode(text[after:], [(s - after, e - after) for s, e in spans
                                                if s >= after]))
    else:
      pieces.append(self._encode(text, spans))
    ids = np.concatenate([p[0] for p in pieces])
    trained = np.concatenate([p[1] for p in pieces])
    image_run_end = sum(len(p[0]) for p in pieces[:3]) if has_image else 0

    n_image_tokens = int(np.count_nonzero(ids == self.image_token_id))
    if n_image_tokens != self.num_image_tokens * has_image:
      # Only possible if the text itself encodes to image_token_id (an id clash).
      raise BadRecord("image_count_mismatch", f"{where}: {n_image_tokens} tokens with the image id "
                                              f"{self.image_token_id}, expected "
                                              f"{self.num_image_tokens * has_image}")
    if image_run_end > self.max_text_len:
      raise BadRecord("no_image", f"{where}: the image tokens end at {image_run_end} > "
                                  f"max_text_len={self.max_text_len}")
    ids, trained = ids[: self.max_text_len], trained[: self.max_text_len]
    if not trained.any():
      raise BadRecord("no_target_tokens", f"{where}: no answer token within max_text_len="
                                          f"{self.max_text_len}")

    input_ids, attention_mask = pad_tokens(ids, self.max_text_len, self.pad_id)
    labels, _ = pad_tokens(np.where(trained, ids, IGNORE_INDEX), self.max_text_len, IGNORE_INDEX)

    images = np.zeros((1, self.image_size, self.image_size, 3), np.float32)
    size = np.full((1, 2), self.image_size, np.int32)
    if has_image:
      rgb = images_lib.decode_image(record_images[0], **self.image_checks)
      size[0] = rgb.shape[1], rgb.shape[0]
      images[0] = preprocess_image(rgb, self.image_size, pad_to_square=self.pad_to_square)
    return {"images": images, "image_mask": np.asarray([has_image]), "input_ids": input_ids,
            "attention_mask": attention_mask, "labels": labels, "ori_size": size}


def answer_rows(labels: np.ndarray) -> np.ndarray:
  """bool[B, T]: the rows that predict an answer token (row t where labels[t + 1] is trained), the
  rows FlexAttention's training path selects HR tokens for (reference/flex_inf.md 1.4, "every row
  from x-1 to y-1 of every answer span [x, y]")."""
  rows = np.zeros(labels.shape, bool)
  rows[:, :-1] = labels[:, 1:] != IGNORE_INDEX
  return rows


def collate(examples: Sequence[dict[str, np.ndarray]], *, ori_sizes: bool = False,
            with_answer_rows: bool = False) -> dict[str, Any]:
  """Batches `LlavaTransform` outputs for `models.llava.Model` (and its high-resolution variants:
  `ori_sizes` adds inputs["ori_sizes"] int32[B, 2], each image's decoded (w, h), for
  FlexAttention's padding margins; `with_answer_rows` adds inputs["answer_rows"] bool[B, T]
  (`answer_rows`) for its training path).

  The model gives the k-th run of image tokens in the batch (reading order) the k-th image, so the
  images of the samples that have one go first, in batch order, and the zero images of text-only
  samples after them; stacking them as they come would hand a text-only sample's zero image to the
  next sample's tokens.

  Returns:
    {"inputs": {"images": float32[B, S, S, 3], "input_ids": int32[B, T],
                "attention_mask": int32[B, T]},
     "labels": int32[B, T]}
  """
  images = np.concatenate([ex["images"] for ex in examples])  # [B, S, S, 3], one slot per sample
  has_image = np.concatenate([ex["image_mask"] for ex in examples])
  order = np.argsort(~has_image, kind="stable")
  labels = np.stack([ex["labels"] for ex in examples])
  inputs = {"images": images[order],
            "input_ids": np.stack([ex["input_ids"] for ex in examples]),
            "attention_mask": np.stack([ex["attention_mask"] for ex in examples])}
  if ori_sizes:
    inputs["ori_sizes"] = np.concatenate([ex["ori_size"] for ex in examples])[order]
  if with_answer_rows:
    inputs["answer_rows"] = answer_rows(labels)
  return {"inputs": inputs, "labels": labels}
