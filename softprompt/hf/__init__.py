"""The seams that track transformers: every touch of its cache, masks, checkpointing, generation defaults and Trainer internals."""
