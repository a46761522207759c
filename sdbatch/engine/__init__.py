"""The GPU (or CPU) engine: models, text, noise, denoising and decoding. Only this package imports torch."""

import os

# sdbatch never downloads: hub ids resolve only from the local cache. Set before diffusers,
# transformers or huggingface_hub are imported (they read it once, at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
