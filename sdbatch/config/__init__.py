"""Config: dataclass schemas for Hydra and the frozen RunSpec they resolve into."""
