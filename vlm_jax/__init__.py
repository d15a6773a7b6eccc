"""vlm_jax: JAX/Flax vision-language models (Flamingo, FlexAttention, INF-LLaVA, LaViT, API)."""
from vlm_jax import host_malloc as _host_malloc

__version__ = "0.1.0"

# Before jax's thread pools exist where possible: see vlm_jax/host_malloc.py (XLA:CPU steps re-fault
# their buffers' pages on every call under glibc's default settings).
_host_malloc.configure()
