"""Inference runtime: generation, speculative decoding (and, next, quantization and the package)."""
