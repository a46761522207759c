"""Model files → diffusers modules: single-file conversion, loading and caching, export, the built-in tiny model."""
