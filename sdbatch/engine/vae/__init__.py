"""Latents → images: VAE decode in batches, exact sliced decode."""
