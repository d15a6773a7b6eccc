"""The special tokens of vlm_jax's text layout (OpenFlamingo's `<image>` / `<|endofchunk|>` markup).

Their ids are fixed by their order in `SPECIAL_TOKENS` for the built-in synthetic tokenizer; tokenizers
loaded from files are asked for their own ids (`vlm_jax.data.tokenizer.special_token_id`).
"""

PAD_TOKEN = "<PAD>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"

SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, MEDIA_TOKEN, EOC_TOKEN)
PAD_ID, EOS_ID, UNK_ID, MEDIA_ID, EOC_ID = range(len(SPECIAL_TOKENS))
