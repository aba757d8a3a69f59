"""Triton GPU kernels for quantized inference, each next to its plain-torch reference and a CPU path."""
