"""Drawing token sequences from a TokenTransformer: a key/value cache, temperature, top-k, top-p.
Windows follow the same schedule as evaluation (transformer.window_starts), so cached and uncached
sampling read every position in the same context."""
from __future__ import annotations

import torch

from core.transformer import TokenTransformer, window_starts


def pick(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def sample_tokens(model: TokenTransformer, labels: torch.Tensor, lr_tokens: torch.Tensor,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Draw the predicted level's tokens (B, hr_len) given labels (B,) and conditioning tokens."""
    n, window = model.shape.hr_len, model.window()
    batch, device = len(labels), labels.device
    tokens = torch.zeros(batch, n, dtype=torch.long, device=device)
    memory = model.encode(labels, lr_tokens)
    positions = torch.arange(n, device=device).expand(batch, n)

    def inputs(start: int, end: int) -> torch.Tensor:  # decoder inputs for positions [start, end)
        before = tokens[:, max(0, start - 1):end - 1]
        if start == 0:
            before = torch.cat([torch.full_like(tokens[:, :1], model.shape.start_token), before], 1)
        return before

    for start, first in window_starts(n, window):
        end = min(n, start + window)
        caches = [{} for _ in model.decoder] if use_cache else None
        for p in range(first, end):
            if use_cache and p > first:
                logits = model(labels, lr_tokens, inputs(p, p + 1), positions[:, p:p + 1], memory, caches,
                               with_prefix=False)
            else:  # the cache's prefill, or every step without a cache
                logits = model(labels, lr_tokens, inputs(start, p + 1), positions[:, start:p + 1], memory, caches)
            tokens[:, p] = pick(logits[:, -1], temperature, top_k, top_p, generator)
    return tokens
