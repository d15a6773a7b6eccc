"""vlm_jax: JAX/Flax vision-language models (Flamingo, FlexAttention, INF-LLaVA, LaViT, API)."""
__version__ = "0.1.0"
