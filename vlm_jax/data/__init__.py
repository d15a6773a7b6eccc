"""Input data for vlm_jax: grain sources, transforms and pipelines (numpy only, no model code).

tokenizer    special tokens, the synthetic WordLevel tokenizer, `load_tokenizer`
synthetic    the embedded coloured-shapes corpus (`SyntheticSource`)
images       decoding to RGB uint8 and CLIP preprocessing
interleaved  OpenFlamingo label masking and record -> example transforms
pipeline     `make_dataset`: config -> checkpointable grain iterator of batches
"""
