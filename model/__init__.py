"""Frugal's model code: the config dataclass and its presets (`config`), the plain-torch transformer with
the DeepSeekMoE feed-forward and its router (`transformer`, the reference), the routed experts on DeepSpeed's
MoE layer for training (`moe_deepspeed`), the byte-level BPE tokenizer (`tokenizer`), and a model on disk:
safetensors and config.json, written atomically and read into owned storage (`io`)."""
