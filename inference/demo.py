"""What `make demo` ends with: samples from the quantized MoE model, decoded plainly and with speculative
decoding by the quantized draft model, with speed and acceptance rate.

python -m inference.demo [--quantized data/quantized_model] [--scheme int8|int4|fp32] [--kv-cache fp32|int8]
(fp32 reads the trained runs data/moe_model and data/draft_model instead)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from inference.generate import Generator, SamplingConfig
from inference.kv_cache import KV_CACHES
from inference.speculative import SpeculativeGenerator

PROMPTS = ("The function returns", "This module provides")


def main(argv: list[str] | None = None) -> None:
    data = Path(os.environ.get("FRUGAL_DATA_DIR", "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantized", type=Path, default=data / "quantized_model")
    parser.add_argument("--runs", type=Path, default=data, help="where moe_model and draft_model are (fp32)")
    parser.add_argument("--scheme", choices=("fp32", "int8", "int4"), default="int4")
    parser.add_argument("--kv-cache", choices=KV_CACHES, default="fp32")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--gamma", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.scheme == "fp32":
        target_dir, draft_dir = args.runs / "moe_model", args.runs / "draft_model"
    else:
        target_dir, draft_dir = args.quantized / args.scheme / "target", args.quantized / args.scheme / "draft"
    target = Generator.from_run(target_dir, kv_cache=args.kv_cache)
    draft = Generator.from_run(draft_dir)
    print(f"target {target_dir} ({args.scheme}, {args.kv_cache} KV cache), draft {draft_dir}")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens)  # greedy: speculation must not change a token
    spec = SpeculativeGenerator(target, draft, gamma=args.gamma)
    for prompt in PROMPTS:
        ids = target.tokenizer.encode(prompt).ids
        start = time.perf_counter()
        plain = target.generate_ids(ids, cfg)
        t_plain = time.perf_counter() - start
        start = time.perf_counter()
        fast = spec.generate_ids(ids, cfg)
        t_spec = time.perf_counter() - start
        print(f"\nprompt: {prompt!r}")
        print(f"  plain       ({len(plain) / t_plain:6.1f} tok/s): {target.tokenizer.decode(plain)!r}")
        print(f"  speculative ({len(fast) / t_spec:6.1f} tok/s): {target.tokenizer.decode(fast)!r}")
        print(f"  identical: {plain == fast}")
    s = spec.stats
    print(
        f"\nspeculative decoding, gamma={args.gamma}: acceptance rate {s.acceptance_rate:.2f}, "
        f"{s.mean_accepted_length:.2f} tokens per target forward pass"
    )


if __name__ == "__main__":
    main()
