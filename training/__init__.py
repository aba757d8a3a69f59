"""Frugal training: DeepSpeed runs over the curated shards, and the evidence they produce.

- `config`: TrainConfig (model preset, data and its mixture by phase, cosine or WSD learning rate, DeepSpeed ZeRO and
  expert parallelism), read from
  JSON or TOML and checked before launch.
- `data`: the packed, resumable loader over curriculum shards (curriculum order, or a seeded mixture of buckets by
  phase: random order, quality anneal), and the held-out rows.
- `launch`: input checks, the run folder (resume or restart), the torchrun command, the rank logs a failure shows.
- `train`: `python -m training.train --config FILE`, the train loop on a DeepSpeed engine (MoE experts on
  DeepSpeed's MoE layer), checkpoints that resume exactly, distillation, the exported model.
- `metrics`: metrics.jsonl, W&B, MFU and the spend meter.
- `ablation`: `python -m training.ablation`, raw against curated data and data schedules (random, WSD, quality
  anneal, curriculum) at equal tokens on one held-out set, paired by seed.
"""
