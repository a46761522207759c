"""What a run leaves behind: the run directory (PNGs with metadata, manifest, config), sheets and sweep index."""
