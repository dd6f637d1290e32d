"""Drawing token sequences from a TokenTransformer.

A DecodeState walks the positions of a sequence in the window schedule of transformer.window_starts (the
one evaluation uses), keeping a key/value cache per window, so cached and uncached decoding read
every position in the same context. On top of it: sampling (temperature, top-k, top-p), true beam
search, the seed's chunked sample-and-rank, and classifier-free guidance. A model trained on captions reads
caption ids beside the labels; its unconditional rows have the null label and the null caption."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.config import option
from core.models.transformer import TokenTransformer, window_starts


@dataclass
class DecodeSettings:
    temperature: float = option(1.0, low=0.0, high=100.0)
    top_k: int = option(0, low=0, high=1 << 20, doc="keep the k most likely tokens (0: all)")
    top_p: float = option(1.0, low=0.0, high=1.0, doc="keep the smallest set holding this probability")
    search: str = option("auto", choices=("auto", "sample", "beam", "rank"),
                         doc="auto: rank if num_beam > 1, else sample")
    beam_width: int = option(1, low=1, high=4096, doc="beam: beams kept; rank: tokens per chunk")
    num_beam: int = option(1, low=1, high=4096, doc="rank: candidates drawn per chunk")
    guidance_scale: float = option(1.0, low=0.0, high=100.0, doc="classifier-free guidance (1: plain conditional)")

    @property
    def mode(self) -> str:
        if self.search == "auto":
            return "rank" if self.num_beam > 1 else "sample"
        return self.search


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits (B, V) scaled by temperature, with tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / max(temperature, 1e-8)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return logits


def draw(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(logits), by inverting the row's CDF at a uniform number drawn from
    generators[r]: per-image randomness keeps results independent of the batch size."""
    cdf = logits.softmax(-1).float().cumsum(-1)
    uniform = torch.cat([torch.rand(1, generator=g) for g in generators]).to(cdf.device)
    tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(1)
    return tokens.clamp(max=cdf.shape[-1] - 1)  # a token of zero probability is never drawn


class DecodeState:
    """The state of decoding a batch: tokens so far and per-window caches, with guidance folded in."""

    def __init__(self, model: TokenTransformer, labels: torch.Tensor, coarse_tokens: torch.Tensor,
                 guidance_scale: float = 1.0, use_cache: bool = True, text: torch.Tensor | None = None):
        self.model, self.use_cache, self.scale = model, use_cache, guidance_scale
        self.guided = guidance_scale != 1.0
        if model.tokenizer is not None and text is None:
            text = model.null_text(len(labels), labels.device)
        if self.guided:  # rows [conditional; unconditional]
            labels = torch.cat([labels, torch.full_like(labels, model.shape.null_label)])
            coarse_tokens = torch.cat([coarse_tokens, coarse_tokens])
            if text is not None:
                text = torch.cat([text, model.null_text(len(text), text.device)])
        self.labels, self.coarse_tokens, self.text = labels, coarse_tokens, text
        self.memory = model.encode(labels, coarse_tokens, text)
        n = model.shape.fine_len
        self.tokens = torch.zeros(len(labels), n, dtype=torch.long, device=labels.device)
        self.schedule = {first: start for start, first in window_starts(n, model.window())}
        self.start, self.caches = 0, None

    @property
    def batch(self) -> int:
        return len(self.labels) // 2 if self.guided else len(self.labels)

    def _inputs(self, begin: int, end: int) -> torch.Tensor:
        """Decoder inputs for positions [begin, end): the token before each, the start token at 0."""
        before = self.tokens[:, max(0, begin - 1):end - 1]
        if begin == 0:
            before = torch.cat([torch.full_like(self.tokens[:, :1], self.model.shape.start_token), before], 1)
        return before

    @torch.no_grad()
    def logits_at(self, p: int) -> torch.Tensor:
        """Logits (batch, V) for position p, given tokens[:, :p]."""
        model, n = self.model, self.model.shape.fine_len
        positions = torch.arange(n, device=self.tokens.device).expand(len(self.tokens), n)
        if p in self.schedule:  # a new window: (re)fill the cache from its start
            self.start = self.schedule[p]
            self.caches = [{} for _ in model.decoder] if self.use_cache else None
        if self.use_cache and p not in self.schedule:
            logits = model(self.labels, self.coarse_tokens, self._inputs(p, p + 1), positions[:, p:p + 1],
                           self.memory, self.caches, with_prefix=False)
        else:
            logits = model(self.labels, self.coarse_tokens, self._inputs(self.start, p + 1),
                           positions[:, self.start:p + 1], self.memory, self.caches, text=self.text)
        logits = logits[:, -1].float()
        if self.guided:
            conditional, unconditional = logits.chunk(2)
            logits = unconditional + self.scale * (conditional - unconditional)
        return logits

    def set(self, p: int, tokens: torch.Tensor) -> None:
        self.tokens[:, p] = torch.cat([tokens, tokens]) if self.guided else tokens

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) batch rows: beams and candidates share their ancestors' caches."""
        if self.guided:
            rows = torch.cat([rows, rows + self.batch])
        self.labels, self.coarse_tokens, self.tokens = self.labels[rows], self.coarse_tokens[rows], self.tokens[rows]
        if self.text is not None:
            self.text = self.text[rows]
        if self.memory is not None:
            self.memory = self.memory[rows]
        for cache in self.caches or []:
            for part in cache.values():
                for key in part:
                    part[key] = part[key][rows]

    def result(self) -> torch.Tensor:
        return self.tokens[:self.batch]


def sample(dec: DecodeState, settings: DecodeSettings, generators: list[torch.Generator], begin: int = 0,
           end: int | None = None) -> torch.Tensor:
    """Positions [begin, end) drawn one by one; returns the summed log-probability of each row's draws."""
    end = dec.model.shape.fine_len if end is None else end
    total = torch.zeros(dec.batch, device=dec.tokens.device)
    for p in range(begin, end):
        logits = dec.logits_at(p)
        if settings.temperature <= 0:  # greedy
            tokens = logits.argmax(-1)
        else:
            logits = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p)
            tokens = draw(logits, generators)
        total += logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        dec.set(p, tokens)
    return total


def beam_search(dec: DecodeState, beams: int) -> torch.Tensor:
    """The sequences of highest log-probability that `beams` beams find (beams=1: greedy)."""
    batch, n = dec.batch, dec.model.shape.fine_len
    device = dec.tokens.device
    dec.select(torch.arange(batch, device=device).repeat_interleave(beams))
    scores = torch.zeros(batch, beams, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: expand only the first
    for p in range(n):
        logprobs = dec.logits_at(p).log_softmax(-1)  # (batch * beams, V)
        vocab = logprobs.shape[-1]
        candidates = (scores[:, :, None] + logprobs.view(batch, beams, vocab)).view(batch, -1)
        scores, flat = candidates.topk(beams, dim=-1)
        parents = flat // vocab + torch.arange(batch, device=device)[:, None] * beams
        dec.select(parents.flatten())
        dec.set(p, (flat % vocab).flatten())
    best = scores.argmax(-1) + torch.arange(batch, device=device) * beams
    dec.select(best)
    return dec.result()


def sample_and_rank(dec: DecodeState, settings: DecodeSettings, generators: list[torch.Generator]) -> torch.Tensor:
    """The seed's search: for each chunk of beam_width tokens, draw num_beam candidate chunks and keep
    the one of highest joint probability."""
    batch, n, device = dec.batch, dec.model.shape.fine_len, dec.tokens.device
    candidates = settings.num_beam
    expanded = [g for g in generators for _ in range(candidates)]
    for begin in range(0, n, settings.beam_width):
        dec.select(torch.arange(batch, device=device).repeat_interleave(candidates))
        scores = sample(dec, settings, expanded, begin, min(n, begin + settings.beam_width))
        best = scores.view(batch, candidates).argmax(-1) + torch.arange(batch, device=device) * candidates
        dec.select(best)
    return dec.result()


def generate_tokens(model: TokenTransformer, labels: torch.Tensor, coarse_tokens: torch.Tensor,
                    settings: DecodeSettings, generators: list[torch.Generator], use_cache: bool = True,
                    text: torch.Tensor | None = None) -> torch.Tensor:
    """The predicted level's tokens (B, fine_len) for labels (B,) and conditioning tokens (B, coarse_len)
    (and caption ids (B, text_len) for a model trained on captions; None: the null caption)."""
    dec = DecodeState(model, labels, coarse_tokens, settings.guidance_scale, use_cache, text)
    if settings.mode == "beam":
        return beam_search(dec, settings.beam_width)
    if settings.mode == "rank":
        return sample_and_rank(dec, settings, generators)
    sample(dec, settings, generators)
    return dec.result()


@torch.no_grad()
def condition_tokens(model: TokenTransformer, labels: torch.Tensor, text: torch.Tensor, settings: DecodeSettings,
                     generators: list[torch.Generator]) -> torch.Tensor:
    """A base model trained on captions: its condition tokens (B, 1) for labels (B,) and caption ids (B, L),
    drawn from its condition head as the sequence's tokens are drawn (temperature, top-k, top-p, guidance
    towards the caption and label: one number of each row's generator)."""
    logits = model.condition_logits(labels, text).float()
    if settings.guidance_scale != 1.0:
        null = torch.full_like(labels, model.shape.null_label)
        unconditional = model.condition_logits(null, model.null_text(len(labels), labels.device)).float()
        logits = unconditional + settings.guidance_scale * (logits - unconditional)
    if settings.temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    return draw(filter_logits(logits, settings.temperature, settings.top_k, settings.top_p), generators)[:, None]


def sample_tokens(model: TokenTransformer, labels: torch.Tensor, coarse_tokens: torch.Tensor, temperature: float = 1.0,
                  generator: torch.Generator | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
    """Plain sampling with one generator for the batch (training previews)."""
    generator = generator or torch.Generator().manual_seed(0)
    return generate_tokens(model, labels, coarse_tokens, DecodeSettings(temperature=temperature),
                           [generator] * len(labels), text=text)
