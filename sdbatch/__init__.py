"""sdbatch: declarative, config-driven batch generation for Stable Diffusion 1.x / 2.x."""

__version__ = "0.1.0"
