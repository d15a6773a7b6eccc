"""TFDS ArrayRecord datasets of finished records: the production path for the web corpora.

  builder   local format (MMC4 jsonl, OBELICS parquet, WebDataset tars, LLaVA JSON) -> a TFDS
            ArrayRecord dataset of records, built once with OpenFlamingo's semantics applied and
            bad records counted in its metadata
  build     the command line for it (`python -m vlm_jax.data.tfds.build --help`)
  source    `config.data.source = "tfds"`: those records back as a random-access source, read by
            `tfds.data_source` / `tfds.builder_from_directory` without TensorFlow
  schema    the stored features and record <-> example conversion

None of these import TensorFlow; tensorflow-datasets' readers, feature encoders and metadata
writers do not need it for ArrayRecord datasets.
"""
