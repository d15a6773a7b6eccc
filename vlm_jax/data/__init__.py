"""Input data for vlm_jax: grain sources, transforms and pipelines (numpy only, no model code).

tokenizer    special tokens, the synthetic WordLevel tokenizer, `load_tokenizer`
synthetic    the embedded coloured-shapes corpus (`SyntheticSource`)
images       decoding to RGB uint8 and CLIP preprocessing
interleaved  OpenFlamingo label masking and record -> example transforms
llava        LLaVA-1.5 conversations -> model inputs (vicuna_v1 template, answer-only labels)
pipeline     `make_dataset`: config -> checkpointable grain iterator of batches
mixture      several datasets per step: concat sub-batches (OpenFlamingo) or weighted sampling
packing      several short examples per row, with `segment_ids` (grain's first-fit packer)
streams      glue that recombines make_dataset streams and keeps their counters
"""
