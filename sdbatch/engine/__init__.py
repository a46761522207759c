"""The GPU (or CPU) engine: models, text encoding, noise, denoising and decoding. Only this package imports torch."""
