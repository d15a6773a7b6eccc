"""Tokenizers for vlm_jax: the built-in synthetic word-level tokenizer and file loading.

The synthetic corpus (`vlm_jax.data.synthetic`) has a closed vocabulary, so its tokenizer is a
`tokenizers` WordLevel model built directly from the corpus word list: no training, no download, and
the same ids on every machine. Special tokens follow OpenFlamingo's conventions (`<image>` marks where
an image sits in the text, `<|endofchunk|>` closes the text that belongs to an image, `<|endoftext|>`
ends a document, `<PAD>` pads) and get small fixed ids so tests can write id sequences by hand:

  PAD_ID=0 "<PAD>", EOS_ID=1 "<|endoftext|>", UNK_ID=2 "<unk>", MEDIA_ID=3 "<image>",
  EOC_ID=4 "<|endofchunk|>", then the corpus words in sorted order.

Real checkpoints bring their own `tokenizer.json`; `load_tokenizer` reads those, and code that needs a
special id should ask the tokenizer (`special_token_id`) rather than assume the constants above.
"""

from __future__ import annotations

import functools
import json
import os

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from vlm_jax.data import synthetic
# Re-exported: the tokenizer module is where callers look for the special tokens and their ids.
from vlm_jax.data.special_tokens import (  # noqa: F401
  EOC_ID, EOC_TOKEN, EOS_ID, EOS_TOKEN, MEDIA_ID, MEDIA_TOKEN, PAD_ID, PAD_TOKEN, SPECIAL_TOKENS, UNK_ID,
  UNK_TOKEN)

# The spec accepted by `load_tokenizer` for the built-in tokenizer.
SYNTHETIC_SPEC = "synthetic"
OPENFLAMINGO_PREFIX = "openflamingo:"


@functools.cache
def _synthetic_tokenizer_json() -> str:
  """The synthetic tokenizer serialized to JSON; built once per process, then cached."""
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
  for word in synthetic.WORDS:
    if word in vocab:
      raise ValueError(f"synthetic.WORDS contains {word!r}, which clashes with a special token.")
    vocab[word] = len(vocab)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
  tok.normalizer = normalizers.Lowercase()
  # Whitespace first, then every punctuation character on its own, so "Answer: red." becomes
  # ["answer", ":", "red", "."] and "?." can never form an out-of-vocabulary token.
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
  )
  # special=True keeps them whole (never normalized or split) and lets decode() skip them;
  # they already sit in the vocabulary, so their ids stay 0..4.
  tok.add_special_tokens(
    [tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
  )
  # WordPiece's decoder joins words with spaces and, with cleanup, glues "." "?" "," back onto
  # the previous word, which reads better than a plain space join.
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
  return tok.to_str()


def synthetic_tokenizer() -> tokenizers.Tokenizer:
  """Returns a fresh WordLevel tokenizer over the synthetic corpus vocabulary.

  A new object each call (tokenizers are mutable: padding/truncation settings), built from a cached
  serialization so repeated calls are cheap.
  """
  tok = tokenizers.Tokenizer.from_str(_synthetic_tokenizer_json())
  # Guard the id contract the tests and the masking code rely on.
  for i, token in enumerate(SPECIAL_TOKENS):
    assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
  return tok


def synthetic_vocab_size() -> int:
  """Vocabulary size of `synthetic_tokenizer()` (special tokens + corpus words)."""
  return len(SPECIAL_TOKENS) + len(synthetic.WORDS)



def load_tokenizer(spec: str) -> tokenizers.Tokenizer:
  """Loads a tokenizer from a spec.

  Args:
    spec: "synthetic" for the built-in tokenizer, a path to a `tokenizer.json` file, or a directory
      that contains one (e.g. a Hugging Face model snapshot); "openflamingo:DIR" for an HF LM tokenizer
      with the tokens OpenFlamingo adds (see `openflamingo_tokenizer`).

  Returns:
    A `tokenizers.Tokenizer`.

  Raises:
    ValueError: if `spec` is none of the above or the file cannot be parsed.
  """
  spec = os.fspath(spec)
  if spec == SYNTHETIC_SPEC:
    return synthetic_tokenizer()
  if spec.startswith(OPENFLAMINGO_PREFIX):
    return openflamingo_tokenizer(spec[len(OPENFLAMINGO_PREFIX):])[0]
  path = spec
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(
        f"Tokenizer directory {spec!r} has no tokenizer.json; expected {SYNTHETIC_SPEC!r}, a "
        "tokenizer.json file or a directory containing tokenizer.json."
      )
  elif not os.path.isfile(path):
    raise ValueError(
      f"Tokenizer spec {spec!r} is not {SYNTHETIC_SPEC!r} and no such file or directory exists; "
      "expected a tokenizer.json file or a directory containing tokenizer.json."
    )
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON.
    raise ValueError(f"Could not parse tokenizer file {path!r}: {e}") from e


def tokenizer_and_special_ids(spec: str) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
  """`load_tokenizer(spec)` and its `{"media", "endofchunk", "pad"}` ids (what generation and
  evaluation need to build prompts and stop)."""
  if os.fspath(spec).startswith(OPENFLAMINGO_PREFIX):
    return openflamingo_tokenizer(spec[len(OPENFLAMINGO_PREFIX):])
  tok = load_tokenizer(spec)
  return tok, {"media": special_token_id(tok, MEDIA_TOKEN),
               "endofchunk": special_token_id(tok, EOC_TOKEN),
               "pad": special_token_id(tok, PAD_TOKEN)}


def special_token_id(tokenizer: tokenizers.Tokenizer, token: str) -> int:
  """Returns the id of `token` in `tokenizer`.

  Raises:
    ValueError: naming the token if the tokenizer does not know it (e.g. a base LM tokenizer to
      which `<image>`/`<|endofchunk|>` were never added).
  """
  token_id = tokenizer.token_to_id(token)
  if token_id is None:
    raise ValueError(
      f"Tokenizer has no token {token!r} (vocab size {tokenizer.get_vocab_size()}); add it as a "
      "special token before using this tokenizer with vlm_jax."
    )
  return int(token_id)


def openflamingo_tokenizer(path: str) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
  """An HF LM tokenizer directory with the tokens OpenFlamingo adds, in its order: `<|endofchunk|>`,
  `<image>` (as additional special tokens), then `<PAD>` if `tokenizer_config.json` names no pad token
  (GPT-NeoX / MPT / LLaMA tokenizers). New tokens take the next free ids, as `add_special_tokens` does
  in transformers, so the ids match the rows OpenFlamingo's resized embedding gives them.

  Returns the tokenizer and `{"media": id, "endofchunk": id, "pad": id}`.
  """
  tok = load_tokenizer(path)
  tok.add_special_tokens(["<|endofchunk|>", "<image>"])
  pad = None
  config = os.path.join(path, "tokenizer_config.json") if os.path.isdir(path) else None
  if config and os.path.isfile(config):
    with open(config) as f:
      pad = json.load(f).get("pad_token")
    if isinstance(pad, dict):  # older transformers store AddedToken dicts
      pad = pad.get("content")
  if pad is None:
    pad = "<PAD>"
    tok.add_special_tokens([pad])
  ids = {"media": special_token_id(tok, "<image>"), "endofchunk": special_token_id(tok, "<|endofchunk|>"),
         "pad": special_token_id(tok, pad)}
  return tok, ids
