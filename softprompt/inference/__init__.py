"""Using a trained adapter: evaluation (loss, perplexity, exact match) and inspection."""
