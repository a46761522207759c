"""The sampling core: the engine, the denoising loop, the UNet-call chain, schedulers, noise and devices."""
