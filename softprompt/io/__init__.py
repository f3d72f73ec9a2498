"""What is read from and written to disk: adapter files (peft format) and base models."""
