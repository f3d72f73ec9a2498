"""Rows in, token ids out: the Alpaca reader and template, the token cache, the demo tasks."""
