"""Readers for web-scale corpora: each turns shards into a grain random-access source of records
(`vlm_jax.data.records`) and exposes `make_source(data_config, split)`.

mmc4         MMC4 interleaved documents, jsonl shards (+ an image directory or base64 images)
obelics      OBELICS interleaved documents, parquet
webdataset   WebDataset tar shards: LAION pairs, or MMC4 documents as OpenFlamingo converts them
llava_json   LLaVA-Instruct conversation files
transforms   OpenFlamingo's LAION / MMC4 record -> example settings and token-level rejections

Shared parts: of_layout (OpenFlamingo's `<image>` / `<|endofchunk|>` text layout), matching
(image<->sentence assignment), image_payloads (fetching and checking encoded image bytes),
line_index / tar_index (byte offsets for random access), config_fields (config.data reading).
"""
