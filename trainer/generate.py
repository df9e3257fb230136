"""`hylo generate`: decode from a checkpoint through each layer's recurrent cache (O(1) state for linear layers,
O(T/L) for RAT, a window cache for sliding-window attention), reporting tokens/s.  `--no-cache` re-runs the full
forward for every token instead (slow; the reference the cached path must equal)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from trainer.errors import ConfigError
from trainer.export import load_trained_model
from trainer.tokenizer import load_tokenizer


@torch.no_grad()
def generate_tokens(model, prompt: torch.Tensor, max_new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding: prompt (B, T0) -> (B, T0 + max_new_tokens)."""
    if use_cache:
        return model.generate(prompt, max_new_tokens)
    tokens = prompt
    for _ in range(max_new_tokens):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def generate_main(argv: list[str]) -> int:
    from trainer.cli import generate_parser

    args = generate_parser().parse_args(argv)
    model, cfg = load_trained_model(Path(args.checkpoint), "generate")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model.eval()
    ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        raise ConfigError("--prompt is empty after tokenization")
    prompt = torch.tensor([ids])
    start = time.perf_counter()
    out = generate_tokens(model, prompt, args.max_new_tokens, use_cache=not args.no_cache)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(out[0].tolist()))
    print(f"[hylo] {args.max_new_tokens} new tokens in {elapsed:.2f} s ({args.max_new_tokens / elapsed:.1f} tokens/s, "
          f"{'recurrent caches' if not args.no_cache else 'full forward per token'})", file=sys.stderr)
    print("TOKENS " + " ".join(map(str, out[0].tolist())), file=sys.stderr)
    return 0
