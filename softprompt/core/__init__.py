"""The model wrapper and what it arranges: `PeftModel`, the batch layout, packing, the decoding loop."""
