"""Prompt sources and prompt-line parsing."""
