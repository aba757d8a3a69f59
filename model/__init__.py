"""Frugal's model code: tokenizer training now; the transformer, MoE layer and gate come with training."""
