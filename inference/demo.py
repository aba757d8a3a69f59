"""What `make demo` ends with: samples from the trained MoE model, quantized, decoded plainly and with
speculative decoding by the draft model, with speed and acceptance rate.

python -m inference.demo [--target data/moe_model] [--draft data/draft_model] [--scheme int8|int4|fp32]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from inference.generate import Generator, SamplingConfig
from inference.quantize import quantize_linears
from inference.speculative import SpeculativeGenerator

PROMPTS = ("The function returns", "This module provides")


def main(argv: list[str] | None = None) -> None:
    data = Path(os.environ.get("FRUGAL_DATA_DIR", "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=data / "moe_model")
    parser.add_argument("--draft", type=Path, default=data / "draft_model")
    parser.add_argument("--scheme", choices=("fp32", "int8", "int4"), default="int8")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--gamma", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    target, draft = Generator.from_run(args.target), Generator.from_run(args.draft)
    if args.scheme != "fp32":
        c = target.model.config
        group = 64 if all(k % 64 == 0 for k in (c.d_model, c.d_ff, c.d_expert)) else 32
        n = quantize_linears(target.model, args.scheme, group_size=group)
        print(f"target {args.target}: {n} weight matrices in {args.scheme} (group {group} for int4)")
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
