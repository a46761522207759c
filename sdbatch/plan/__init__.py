"""Prompt lines → ImageJobs (seeds, names, grid cells, feature settings) → batches that share a UNet call."""
