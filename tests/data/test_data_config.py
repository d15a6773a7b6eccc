"""`config.data` is parsed once, at make_dataset's entry, into a typed DataConfig; unknown keys and
values of the wrong type fail there, naming the key."""

import ml_collections
import pytest

from vlm_jax.data import data_config
from vlm_jax.data.data_config import DataConfig, parse
from vlm_jax.data.formats import mmc4
from vlm_jax.data.pipeline import make_dataset

SYNTHETIC = dict(source="synthetic", kind="pairs", tokenizer="synthetic", image_size=16,
                 max_images=1, max_text_len=16, num_records=64, seed=0, num_threads=1)


def test_unknown_or_misspelt_key_names_the_key_and_the_fields():
  with pytest.raises(ValueError, match=r"config\.data\.imgae_size is not a data field \(did you "
                                       r"mean 'image_size'.*the fields are: source, tokenizer"):
    make_dataset({**SYNTHETIC, "imgae_size": 16}, split="train", batch_size=2, process_index=0,
                 process_count=1)
  mix = {"mixture": {"a": {**SYNTHETIC, "weigth": 0.5, "batch_size": 2}}}
  with pytest.raises(ValueError, match=r"config\.data\.mixture\.a\.weigth is not a data field"):
    parse(mix)


def test_values_are_typed_once():
  cfg = parse(ml_collections.ConfigDict({**SYNTHETIC, "image_size": 16.0, "random_flip": 1}))
  assert cfg.image_size == 16 and isinstance(cfg.image_size, int)
  assert cfg.random_flip == 1.0 and isinstance(cfg.random_flip, float)
  with pytest.raises(ValueError, match=r"config\.data\.max_text_len='long' is not a valid int"):
    parse({**SYNTHETIC, "max_text_len": "long"})
  with pytest.raises(ValueError, match=r"config\.data\.image_size=16\.5 is not a valid int"):
    parse({**SYNTHETIC, "image_size": 16.5})
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer=3 is not a valid str"):
    parse({**SYNTHETIC, "tokenizer": 3})
  assert parse(cfg) is cfg  # a parsed config passes through


def test_none_has_one_meaning_per_field():
  # Reader options: None = the reader's default (OpenFlamingo's for MMC4).
  options = mmc4.MMC4Options.from_config(parse({"min_image_bytes": None, "sim_threshold": None}))
  assert (options.min_image_bytes, options.sim_threshold) == (11_000, 0.24)
  # The image limits: None = no limit (and absent = the library's default).
  assert mmc4.MMC4Options.from_config(parse({"max_image_pixels": None})).max_image_pixels is None
  assert mmc4.MMC4Options.from_config(parse({})).max_image_pixels == 89_478_485
  # Required fields: None is "missing", with the reader named.
  with pytest.raises(ValueError, match=r"synthetic: config\.data\.image_size is missing"):
    make_dataset({**SYNTHETIC, "image_size": None}, split="train", batch_size=2, process_index=0,
                 process_count=1)


def test_make_dataset_reads_the_raw_config_once(monkeypatch):
  reads = []
  real = data_config._items
  monkeypatch.setattr(data_config, "_items", lambda c, where: reads.append(where) or real(c, where))
  ds = make_dataset(SYNTHETIC, split="train", batch_size=2, process_index=0, process_count=1)
  next(iter(ds))
  assert reads == ["config.data"]
  reads.clear()
  mixture = {"mixture": {"a": {**SYNTHETIC, "batch_size": 2, "weight": 0.5},
                         "b": {**SYNTHETIC, "batch_size": 2}}}
  next(iter(make_dataset(mixture, split="train", batch_size=4, process_index=0, process_count=1)))
  assert reads == ["config.data", "config.data.mixture", "config.data.mixture.a",
                   "config.data.mixture.b"]


def test_fields_cover_every_key_the_configs_set():
  from vlm_jax.config_base import load_config

  for preset in ("", "tiny", "of3b"):
    config = load_config("configs/flamingo.py", preset)
    parsed = parse(config.data)
    assert isinstance(parsed, DataConfig)
    for component in (parsed.mixture or {}).values():
      assert isinstance(component, DataConfig)
