"""Text conditioning: the offline CLIP tokenizer, weighted long-prompt encoding, Textual Inversion embeddings."""
