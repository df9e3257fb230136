"""`hylo generate`: decode from a checkpoint through each layer's recurrent cache (O(1) state for linear layers,
O(T/L) for RAT, a window cache for sliding-window attention), reporting tokens/s.  Greedy by default; sampling
with temperature, top-k and top-p (nucleus), reproducible with a seed.  Several prompts (a file, one per line)
decode together, prompts of the same token length in one batch.  `--no-cache` re-runs the full forward for every
token instead (slow; the reference the cached path must equal)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from hylo.trainer.checkpointing.export import load_trained_model
from hylo.trainer.data.tokenizer import load_tokenizer
from hylo.trainer.errors import ConfigError


class Sampler:
    """Next tokens from logits (batch, vocab): greedy at temperature 0, else a draw from the softmax at that
    temperature, kept to the `top_k` most likely tokens and to the smallest set whose probability reaches `top_p`
    (the most likely token always stays)."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if not math.isfinite(temperature) or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"sampling needs --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1; got "
                              f"{temperature}, {top_k}, {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # mass before this token already reaches top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator).to(logits.device)


@torch.no_grad()
def generate_tokens(model, prompt: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
                    pick: Sampler | None = None, on_token=None) -> torch.Tensor:
    """prompt (B, T0) -> (B, T0 + max_new_tokens); greedy unless `pick` samples."""
    if use_cache:
        return model.generate(prompt, max_new_tokens, pick=pick, on_token=on_token)
    tokens = prompt
    for _ in range(max_new_tokens):
        logits = model(tokens)[:, -1]
        new = logits.argmax(-1, keepdim=True) if pick is None else pick(logits)
        tokens = torch.cat([tokens, new], dim=1)
        if on_token is not None:
            on_token(new)
    return tokens


class StreamPrinter:
    """Prints the new text as each token of one prompt is decoded."""

    def __init__(self, tokenizer, ids: list[int]):
        self.tokenizer, self.ids = tokenizer, list(ids)
        self.shown = len(tokenizer.decode(self.ids))

    def __call__(self, new: torch.Tensor) -> None:
        self.ids.append(int(new[0, 0]))
        text = self.tokenizer.decode(self.ids)
        print(text[self.shown:], end="", flush=True)
        self.shown = len(text)


def read_prompts(args) -> list[str]:
    if (args.prompt is not None) == bool(args.prompts):
        raise ConfigError("give one of --prompt TEXT or --prompts FILE (one prompt per line)")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ConfigError("--prompt is empty: give the text to continue, e.g. --prompt 'def main('")
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise ConfigError(f"--prompts file '{path}' does not exist")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts file '{path}' holds no prompt (one per line)")
    return prompts


def run(args) -> int:
    """`hylo generate` (arguments: trainer/arguments.py)."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: give how many tokens to decode (>= 1)")
    prompts = read_prompts(args)
    pick = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    model, cfg = load_trained_model(Path(args.checkpoint), "generate")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model.eval()
    encoded = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    if not all(encoded):
        raise ConfigError("a prompt is empty after tokenization")
    batches: dict[int, list[int]] = {}  # prompts of one token length decode as one batch
    for i, ids in enumerate(encoded):
        batches.setdefault(len(ids), []).append(i)
    results: dict[int, list[int]] = {}
    start = time.perf_counter()
    for members in batches.values():
        prompt = torch.tensor([encoded[i] for i in members])
        on_token = None
        if args.stream and len(prompts) == 1:
            print(prompts[0], end="", flush=True)
            on_token = StreamPrinter(tokenizer, encoded[0])
        out = generate_tokens(model, prompt, args.max_new_tokens, use_cache=not args.no_cache, pick=pick,
                              on_token=on_token)
        results.update({i: out[row].tolist() for row, i in enumerate(members)})
    elapsed = time.perf_counter() - start
    for i in range(len(prompts)):
        if not (args.stream and len(prompts) == 1):
            print(tokenizer.decode(results[i]))
        else:
            print()
        if args.show_tokens:
            print("TOKENS " + " ".join(map(str, results[i])), file=sys.stderr)
    total = args.max_new_tokens * len(prompts)
    how = "greedy" if args.temperature == 0 else (f"sampled at temperature {args.temperature:g}, top-k "
                                                  f"{args.top_k or 'all'}, top-p {args.top_p:g}")
    print(f"[hylo] {total} new tokens for {len(prompts)} prompt(s) in {len(batches)} batch(es), {elapsed:.2f} s "
          f"({total / elapsed:.1f} tokens/s, {how}, "
          f"{'recurrent caches' if not args.no_cache else 'full forward per token'})", file=sys.stderr)
    return 0
