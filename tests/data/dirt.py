"""A corpus of real-world dirt for the web-data readers, built in code (no binary files committed).

Every usable image carries a fingerprint: a 4 x 4 grid of black / white blocks spelling
`doc << 5 | position` (its document and its place in the document's image list), which survives
every conversion the pipeline applies (CMYK, palette, 16-bit, 1-bit, alpha, EXIF rotation, JPEG,
the CLIP resize and crop), so a test can tell which image landed on which `<image>` token.

`IMAGE_KINDS` maps a kind of image to its builder and what the readers must do with it: `None`
(usable, kept) or the `records.REASONS` name it is left out with. `documents()` lays the kinds and
the kinds of broken documents out as MMC4 documents, each with the survivors it must yield.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import struct
import zlib
from typing import Callable

import numpy as np
from PIL import Image

SIDE = 64  # every fingerprinted image is SIDE x SIDE before any conversion
GRID = 4


# ----------------------------------------------------------------------------- fingerprints


def fingerprint_code(doc: int, position: int) -> int:
  return (doc << 5) | position


def pattern(doc: int, position: int) -> np.ndarray:
  """bool[SIDE, SIDE]: the grid of (doc, position), most significant bit top left."""
  code = fingerprint_code(doc, position)
  bits = np.array([(code >> (GRID * GRID - 1 - i)) & 1 for i in range(GRID * GRID)], bool)
  block = SIDE // GRID
  return np.kron(bits.reshape(GRID, GRID), np.ones((block, block), bool)).astype(bool)


def read_fingerprint(image: np.ndarray) -> tuple[int, int]:
  """(doc, position) of an image of any square size, uint8 or CLIP-normalised, [S, S, 3]."""
  image = np.asarray(image, np.float32)
  side = image.shape[0]
  gray = image.mean(-1)
  threshold = (gray.max() + gray.min()) / 2  # works for uint8 and for normalised floats
  centres = (np.arange(GRID) * side // GRID + side // (2 * GRID))
  bits = (gray[np.ix_(centres, centres)] > threshold).reshape(-1)
  code = int("".join("1" if b else "0" for b in bits), 2)
  return code >> 5, code & 31


def _encode(pil: Image.Image, fmt: str, **kwargs) -> bytes:
  out = io.BytesIO()
  pil.save(out, fmt, **kwargs)
  return out.getvalue()


def _rgb(doc, position) -> np.ndarray:
  return np.repeat(pattern(doc, position)[..., None], 3, -1).astype(np.uint8) * 255


# ----------------------------------------------------------------------------- image kinds
# Each builder takes (doc, position) and returns encoded bytes (None: the file is never written).


def _png(doc, pos):
  return _encode(Image.fromarray(_rgb(doc, pos)), "PNG")


def _cmyk_jpeg(doc, pos):
  return _encode(Image.fromarray(_rgb(doc, pos)).convert("CMYK"), "JPEG", quality=95)


def _palette_png(doc, pos):
  return _encode(Image.fromarray(_rgb(doc, pos)).convert("P"), "PNG")


def _rgba_png(doc, pos):
  rgba = np.concatenate([_rgb(doc, pos), np.full((SIDE, SIDE, 1), 255, np.uint8)], -1)
  return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def _la_png(doc, pos):
  la = np.stack([pattern(doc, pos).astype(np.uint8) * 255, np.full((SIDE, SIDE), 255, np.uint8)],
                -1)
  return _encode(Image.fromarray(la, "LA"), "PNG")


def _gray16_png(doc, pos):
  values = pattern(doc, pos).astype(np.uint16) * 65535
  return _encode(Image.fromarray(values), "PNG")  # uint16 -> mode I;16


def _bit1_png(doc, pos):
  return _encode(Image.fromarray(pattern(doc, pos)).convert("1"), "PNG")


def _exif_rotated_jpeg(doc, pos):
  # Stored rotated a quarter turn; EXIF Orientation 6 says "rotate 90 degrees clockwise to show",
  # so only a reader that applies it sees the fingerprint.
  stored = Image.fromarray(_rgb(doc, pos)).transpose(Image.Transpose.ROTATE_90)
  exif = Image.Exif()
  exif[0x0112] = 6
  return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _corrupt(doc, pos):
  return b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(doc).integers(0, 256, 2000, np.uint8))


def _truncated_png(doc, pos):
  data = _encode(Image.fromarray(np.random.default_rng(doc).integers(
    0, 256, (SIDE, SIDE, 3), np.uint8)), "PNG")
  return data[: len(data) // 2]


def _truncated_jpeg(doc, pos):
  data = _encode(Image.fromarray(_rgb(doc, pos)), "JPEG", quality=95)
  return data[: len(data) // 2]


def _zero_bytes(doc, pos):
  return b""


def _html(doc, pos):
  return b"<!DOCTYPE html><html><body>404 Not Found</body></html>"


def _one_by_one(doc, pos):
  return _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")


def _thin(doc, pos):
  return _encode(Image.new("RGB", (7, SIDE), (200, 10, 10)), "PNG")


def _chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
  crc = zlib.crc32(kind + data) if crc is None else crc
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
  """A 1-bit PNG that declares width x height but holds one row of pixels: ~100 bytes, however large
  the declared size (the decompression bomb of the issue is a full 20000 x 20000 one of 48.7 kB)."""
  ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  row = b"\x00" * (1 + (width + 7) // 8)
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(row, 9))
          + _chunk(b"IEND", b""))


def _bomb(doc, pos):
  return png_header_only(20_000, 20_000)


def _bomb_under_pil_guard(doc, pos):
  # 100 M pixels: over our limit (89.5 M) but under PIL's own error (2 x 89.5 M), so PIL only warns
  # and our header check must refuse it.
  return png_header_only(10_000, 10_000)


def full_png_bomb(side: int = 20_000) -> bytes:
  """The issue's bomb: a complete, valid 1-bit side x side PNG of zeros (~49 kB for 20000 px)."""
  ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
  rows = zlib.compressobj(9)
  row = b"\x00" * (1 + (side + 7) // 8)
  idat = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
          + _chunk(b"IEND", b""))


def _bad_crc_png(doc, pos):
  data = _png(doc, pos)
  # Flip the IHDR checksum: PIL raises SyntaxError ("broken PNG file").
  return data[:29] + bytes([data[29] ^ 0xFF]) + data[30:]


def _lying_header_png(doc, pos):
  # IHDR says 64 x 64 RGB, the pixel data is for 8 x 8: decoding runs out of data.
  small = _encode(Image.new("RGB", (8, 8), (10, 200, 10)), "PNG")
  ihdr = struct.pack(">IIBBBBB", SIDE, SIDE, 8, 2, 0, 0, 0)
  return small[:8] + _chunk(b"IHDR", ihdr) + small[33:]


def _gif_spacer(doc, pos):
  return _encode(Image.new("P", (1, 1)), "GIF")


@dataclasses.dataclass(frozen=True)
class ImageKind:
  build: Callable[[int, int], bytes | None]
  reason: str | None  # None: usable


IMAGE_KINDS: dict[str, ImageKind] = {
  "rgb_png": ImageKind(_png, None),
  "cmyk_jpeg": ImageKind(_cmyk_jpeg, None),
  "palette_png": ImageKind(_palette_png, None),
  "rgba_png": ImageKind(_rgba_png, None),
  "la_png": ImageKind(_la_png, None),
  "gray16_png": ImageKind(_gray16_png, None),
  "bit1_png": ImageKind(_bit1_png, None),
  "exif_rotated_jpeg": ImageKind(_exif_rotated_jpeg, None),
  "corrupt": ImageKind(_corrupt, "image_undecodable"),
  "truncated_png": ImageKind(_truncated_png, "image_undecodable"),
  "truncated_jpeg": ImageKind(_truncated_jpeg, "image_undecodable"),
  "html_page": ImageKind(_html, "image_undecodable"),
  "bad_crc_png": ImageKind(_bad_crc_png, "image_undecodable"),
  "lying_header_png": ImageKind(_lying_header_png, "image_undecodable"),
  "zero_bytes": ImageKind(_zero_bytes, "image_empty"),
  "missing": ImageKind(lambda doc, pos: None, "image_missing"),
  "one_by_one": ImageKind(_one_by_one, "image_too_small"),
  "thin_7px": ImageKind(_thin, "image_too_small"),
  "gif_spacer": ImageKind(_gif_spacer, "image_too_small"),
  "decompression_bomb": ImageKind(_bomb, "image_too_large"),
  "bomb_under_pil_guard": ImageKind(_bomb_under_pil_guard, "image_too_large"),
}
GOOD_KINDS = [k for k, v in IMAGE_KINDS.items() if v.reason is None]
BAD_KINDS = [k for k, v in IMAGE_KINDS.items() if v.reason is not None]


# ----------------------------------------------------------------------------- MMC4 documents


@dataclasses.dataclass
class Doc:
  """One MMC4 document and what it must become.

  line: the jsonl line (bytes: some are not valid UTF-8 / JSON).
  files: {image_name: bytes} to write into image_dir (absent names are missing files).
  survivors: [(image position, sentence index)] in text order, as the batch must hold them after
    truncation; None when the document is dropped.
  skip: the record's skip reason when it is dropped (at the reader or the transform).
  dropped: {reason: n} images the reader leaves out.
  """

  line: bytes
  files: dict[str, bytes]
  survivors: list[tuple[int, int]] | None
  skip: str | None = None
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)


def sentence(doc: int, j: int, words: int = 3) -> str:
  """A sentence that names its document and index ("d3 s1 ...") so a test can find it."""
  return " ".join([f"d{doc}", f"s{j}"] + ["word"] * words) + "."


def _mmc4(doc: int, kinds: list[str], sim: list[list[float]] | None = None,
          sentences: list[str] | None = None, names: list[str] | None = None,
          with_base64: bool = False) -> tuple[dict, dict[str, bytes]]:
  n = len(kinds)
  sentences = sentences if sentences is not None else [sentence(doc, j) for j in range(n)]
  if sim is None:  # image k matches sentence k
    sim = [[0.3 if j == k else 0.1 for j in range(len(sentences))] for k in range(n)]
  names = names or [f"d{doc}_{k}_{kind}.img" for k, kind in enumerate(kinds)]
  infos, files = [], {}
  for k, (kind, name) in enumerate(zip(kinds, names)):
    info = {"image_name": name, "matched_text_index": k, "matched_sim": 0.3, "raw_url": "http://x"}
    data = IMAGE_KINDS[kind].build(doc, k)
    if data is not None and name not in files:
      files[name] = data
      if with_base64:
        info["image_base64"] = base64.b64encode(data).decode()
    infos.append(info)
  return {"text_list": sentences, "image_info": infos, "similarity_matrix": sim}, files


def documents(with_base64: bool = False) -> list[Doc]:
  """The MMC4 dirt corpus (at most 6 images and 256 tokens per document are kept: see CONFIG)."""
  docs: list[Doc] = []

  def add(body, files, survivors, skip=None, dropped=None, raw=None):
    line = raw if raw is not None else json.dumps(body).encode()
    docs.append(Doc(line, files, survivors, skip, dropped or {}))

  # One document per image kind, between two good images: a bad image is left out alone.
  for kind in IMAGE_KINDS:
    d = len(docs)
    body, files = _mmc4(d, ["rgb_png", kind, "rgb_png"], with_base64=with_base64)
    reason = IMAGE_KINDS[kind].reason
    add(body, files, [(0, 0), (2, 2)] if reason else [(0, 0), (1, 1), (2, 2)],
        dropped={reason: 1} if reason else None)
  # Every image unusable: the document goes, counted under its images' most common reason.
  d = len(docs)
  body, files = _mmc4(d, ["missing", "missing", "corrupt"], with_base64=with_base64)
  add(body, files, None, "image_missing", {"image_missing": 2, "image_undecodable": 1})
  # A JSON line that does not parse, and one that is not UTF-8.
  add(None, {}, None, "malformed_json", raw=b'{"text_list": ["d0 s0."], "image_info": [')
  add(None, {}, None, "malformed_json", raw=b'{"text_list": ["caf\xe9 \xff\xfe"], "image_info": []}')
  # An empty text list: nothing an image could match.
  d = len(docs)
  body, files = _mmc4(d, ["rgb_png"], sim=[[]], sentences=[], with_base64=with_base64)
  add(body, files, None, "no_image")
  # A similarity matrix of the wrong shape (2 images, rows for 1).
  d = len(docs)
  body, files = _mmc4(d, ["rgb_png", "rgb_png"], sim=[[0.3, 0.1]], with_base64=with_base64)
  add(body, files, None, "malformed_json")
  # Every similarity under the 0.24 threshold.
  d = len(docs)
  body, files = _mmc4(d, ["rgb_png", "rgb_png"], sim=[[0.2, 0.1], [0.1, 0.239]],
                      with_base64=with_base64)
  add(body, files, None, "no_image")
  # A similarity of exactly 0.24 is kept (>= threshold), 0.2399 is not.
  d = len(docs)
  body, files = _mmc4(d, ["rgb_png", "rgb_png", "rgb_png"],
                      sim=[[0.24, 0.1, 0.1], [0.1, 0.2399, 0.1], [0.1, 0.1, 0.3]],
                      with_base64=with_base64)
  add(body, files, [(0, 0), (2, 2)])
  # Long documents: one of 5000 words (truncated to the token budget, both early images kept), and
  # one whose second image matches its last sentence, whose <image> token truncation cuts away.
  d = len(docs)
  long = [sentence(d, 0), sentence(d, 1)] + [sentence(d, j, words=60) for j in range(2, 85)]
  sim = [[0.3 if j == k else 0.1 for j in range(len(long))] for k in range(2)]
  body, files = _mmc4(d, ["rgb_png", "rgb_png"], sim=sim, sentences=long, with_base64=with_base64)
  add(body, files, [(0, 0), (1, 1)])
  d = len(docs)
  long = [sentence(d, j, words=20) for j in range(30)]
  sim = [[0.3 if j == (0 if k == 0 else 29) else 0.1 for j in range(30)] for k in range(2)]
  body, files = _mmc4(d, ["rgb_png", "rgb_png"], sim=sim, sentences=long, with_base64=with_base64)
  add(body, files, [(0, 0)])
  # More images than slots (8 > max_images=6): the first 6 in text order, the text cut before the
  # 7th (the images are listed in reverse, so text order is not list order).
  d = len(docs)
  sim = [[0.3 if j == 7 - k else 0.1 for j in range(8)] for k in range(8)]
  body, files = _mmc4(d, ["rgb_png"] * 8, sim=sim, with_base64=with_base64)
  add(body, files, [(7 - j, j) for j in range(6)])
  # A repeated image name: the first occurrence is kept, the second left out.
  d = len(docs)
  body, files = _mmc4(d, ["rgb_png", "rgb_png", "rgb_png"],
                      names=[f"d{d}_a.img", f"d{d}_b.img", f"d{d}_a.img"], with_base64=with_base64)
  add(body, files, [(0, 0), (1, 1)], dropped={"image_duplicate": 1})
  # A document whose only usable image matches its last sentence with nothing after: the image has
  # no text to condition (OpenFlamingo's "image only at end"), after one image was left out.
  d = len(docs)
  body, files = _mmc4(d, ["corrupt", "rgb_png"], sim=[[0.1, 0.3], [0.1, 0.3]],
                      sentences=[sentence(d, 0), ""], with_base64=with_base64)
  add(body, files, None, "image_only_at_end", {"image_undecodable": 1})
  return docs


# The data config every reader test uses (OpenFlamingo's MMC4 settings but the byte floor, which the
# fingerprint images are under, and the single-image coin, which would make survivors random).
CONFIG = {"image_size": 32, "max_images": 6, "max_text_len": 256, "min_image_bytes": 0,
          "single_image_keep_prob": 1.0, "image_dtype": "uint8", "seed": 0, "num_threads": 2}


def write_mmc4(root, docs: list[Doc]) -> tuple[str, str]:
  """(jsonl path, image_dir) of `docs` written under `root` (a pathlib.Path)."""
  image_dir = root / "images"
  image_dir.mkdir(parents=True, exist_ok=True)
  for doc in docs:
    for name, data in doc.files.items():
      (image_dir / name).write_bytes(data)
  path = root / "dirt.jsonl"
  path.write_bytes(b"\n".join(doc.line for doc in docs) + b"\n")
  return str(path), str(image_dir)


def train_bpe_tokenizer(directory) -> str:
  """A byte-level BPE (GPT-2 / GPT-NeoX style) trained on the corpus words, saved as
  `directory/tokenizer.json`; returns the `openflamingo:` spec that adds `<image>`,
  `<|endofchunk|>` and `<PAD>` the way OpenFlamingo does."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [sentence(d, j) for d in range(64) for j in range(90)]
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  return f"openflamingo:{directory}"
