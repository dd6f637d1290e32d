"""Drawing token sequences from a TokenTransformer.

A DecodeState walks the positions of a sequence in the window schedule of transformer.window_starts (the
one evaluation uses). At the first position of a window it reads the window's start with the model's own
forward; after that, one position per step, each block's keys and values kept in buffers preallocated to
the window's length (a step writes its key and value in place), so cached and uncached decoding read
every position in the same context. On top of it: sampling (temperature, top-k, top-p), true beam
search, the seed's chunked sample-and-rank, and classifier-free guidance. A model trained on captions reads
caption ids beside the labels; its unconditional rows have the null label and the null caption."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from core.config import option
from core.models.transformer import Attention, TokenTransformer, window_starts


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
    logits = logits.float()
    if temperature != 1.0:  # dividing by 1 changes nothing: skip the pass over the logits
        logits = logits / max(temperature, 1e-8)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return logits


def uniform_draws(generators: list[torch.Generator], steps: int) -> torch.Tensor:
    """(steps, rows) uniform numbers: at each step, row r takes the next number of generators[r], rows
    sharing a generator in row order. Drawn at once per generator, they are the numbers that one draw
    per row and step would give (a CPU generator's rand(n) is n successive rand(1))."""
    rows_of: dict[int, list[int]] = {}
    for row, g in enumerate(generators):
        rows_of.setdefault(id(g), []).append(row)
    columns: dict[int, torch.Tensor] = {}
    for rows in rows_of.values():
        numbers = torch.rand(steps * len(rows), generator=generators[rows[0]]).view(steps, len(rows))
        columns.update((row, numbers[:, j]) for j, row in enumerate(rows))
    return torch.stack([columns[row] for row in range(len(generators))], 1)


def draw(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits), by inverting the row's CDF at uniform[r] (per-image
    randomness keeps results independent of the batch size)."""
    cdf = logits.softmax(-1).float().cumsum(-1)
    tokens = torch.searchsorted(cdf, (uniform.to(cdf.device) * cdf[:, -1])[:, None], right=True).squeeze(1)
    return tokens.clamp(max=cdf.shape[-1] - 1)  # a token of zero probability is never drawn


class DecodeState:
    """The state of decoding a batch: tokens so far and each block's keys and values, with guidance
    folded in (rows [conditional; unconditional])."""

    def __init__(self, model: TokenTransformer, labels: torch.Tensor, coarse_tokens: torch.Tensor,
                 guidance_scale: float = 1.0, use_cache: bool = True, step: Callable = None,
                 text: torch.Tensor | None = None):
        self.model, self.use_cache, self.scale = model, use_cache, guidance_scale
        self.step = step or step_logits  # or a compiled step_logits
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
        self.positions = torch.arange(n, device=labels.device).expand(len(labels), n)
        self.schedule = {first: start for start, first in window_starts(n, model.window())}
        self.capacity = model.prefix_len + model.window()  # decoder positions one window holds
        self.start = 0
        self.keys: list[torch.Tensor] = []  # per block: (rows, heads, capacity, head_dim), the first `length` filled
        self.values: list[torch.Tensor] = []
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []  # per block: the memory's keys and values
        self.length = 0

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
        if p in self.schedule:  # a new window: read it from its start
            self.start = self.schedule[p]
        if self.use_cache and p not in self.schedule:
            logits = self.step(self.model, self.tokens[:, p - 1:p], self.positions[:, p:p + 1], self.keys, self.values,
                               self.cross, self.length)
            self.length += 1
        else:
            caches = [{} for _ in self.model.decoder] if self.use_cache else None
            logits = self.model(self.labels, self.coarse_tokens, self._inputs(self.start, p + 1),
                                self.positions[:, self.start:p + 1], self.memory, caches, text=self.text)
            if caches is not None:
                self._keep(caches)
        logits = logits[:, -1].float()
        if self.guided:
            conditional, unconditional = logits.chunk(2)
            logits = unconditional + self.scale * (conditional - unconditional)
        return logits

    def _keep(self, caches: list[dict]) -> None:
        """Move the keys and values that the model's forward left in `caches` into the buffers."""
        first = caches[0]["self"]["k"]
        self.length = first.shape[2]
        if not self.keys or self.keys[0].shape[0] != first.shape[0]:
            shape = (first.shape[0], first.shape[1], self.capacity, first.shape[3])
            self.keys = [first.new_empty(shape) for _ in caches]
            self.values = [first.new_empty(shape) for _ in caches]
        for cache, keys, values in zip(caches, self.keys, self.values):
            keys[:, :, :self.length] = cache["self"]["k"]
            values[:, :, :self.length] = cache["self"]["v"]
        self.cross = [(cache["cross"]["k"], cache["cross"]["v"]) for cache in caches if "cross" in cache]

    def set(self, p: int, tokens: torch.Tensor) -> None:
        self.tokens[:, p] = torch.cat([tokens, tokens]) if self.guided else tokens

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) batch rows: beams and candidates share their ancestors' keys and values."""
        if self.guided:
            rows = torch.cat([rows, rows + self.batch])
        self.labels, self.coarse_tokens, self.tokens = self.labels[rows], self.coarse_tokens[rows], self.tokens[rows]
        self.positions = self.positions[:1].expand(len(rows), -1)
        if self.text is not None:
            self.text = self.text[rows]
        if self.memory is not None:
            self.memory = self.memory[rows]
        self.keys = [keys[rows] for keys in self.keys]
        self.values = [values[rows] for values in self.values]
        self.cross = [(keys[rows], values[rows]) for keys, values in self.cross]

    def result(self) -> torch.Tensor:
        return self.tokens[:self.batch]


def step_logits(model: TokenTransformer, inputs: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], cross: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> torch.Tensor:
    """TokenTransformer.forward (and Block.forward) for one position per row: the decoder inputs and positions
    (rows, 1); each block's earlier keys and values are read from its buffers (rows, heads, capacity,
    head_dim), whose first `length` slots are filled, and the position's own are written after them.
    Logits (rows, 1, V)."""
    x = model.tok_emb(inputs) + model.pos_emb(positions)
    for i, block in enumerate(model.decoder):
        h = block.ln1(x)
        k, v = block.attn.keys_values(h)
        keys[i][:, :, length:length + 1] = k
        values[i][:, :, length:length + 1] = v
        q = block.attn.split_heads(block.attn.q(h))
        x = x + _attend(block.attn, q, keys[i][:, :, :length + 1], values[i][:, :, :length + 1])
        if block.cross is not None:
            q = block.cross.split_heads(block.cross.q(block.ln_cross(x)))
            x = x + _attend(block.cross, q, *cross[i])
        x = x + block.mlp(block.ln2(x))
    return model.head(model.ln_f(x))


def _attend(attn: Attention, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention.forward's output for one query position, given the keys and values it reads."""
    y = F.scaled_dot_product_attention(q, keys, values)
    b, h, t, hd = y.shape
    return attn.proj(y.transpose(1, 2).reshape(b, t, h * hd))


def sample(dec: DecodeState, settings: DecodeSettings, generators: list[torch.Generator], begin: int = 0,
           end: int | None = None, scored: bool = False) -> torch.Tensor | None:
    """Positions [begin, end) drawn one by one; with `scored`, returns the summed log-probability of each
    row's draws."""
    end = dec.model.shape.fine_len if end is None else end
    total = torch.zeros(dec.batch, device=dec.tokens.device) if scored else None
    uniforms = uniform_draws(generators, end - begin) if settings.temperature > 0 else None
    for step, p in enumerate(range(begin, end)):
        logits = dec.logits_at(p)
        if uniforms is None:  # greedy
            tokens = logits.argmax(-1)
        else:
            logits = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p)
            tokens = draw(logits, uniforms[step])
        if scored:
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
        scores = sample(dec, settings, expanded, begin, min(n, begin + settings.beam_width), scored=True)
        best = scores.view(batch, candidates).argmax(-1) + torch.arange(batch, device=device) * candidates
        dec.select(best)
    return dec.result()


@torch.no_grad()
def generate_tokens(model: TokenTransformer, labels: torch.Tensor, coarse_tokens: torch.Tensor,
                    settings: DecodeSettings, generators: list[torch.Generator], use_cache: bool = True,
                    step: Callable | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
    """The predicted level's tokens (B, fine_len) for labels (B,) and conditioning tokens (B, coarse_len)
    (and caption ids (B, text_len) for a model trained on captions; None: the null caption).
    `step` replaces step_logits (torch.compile(step_logits))."""
    dec = DecodeState(model, labels, coarse_tokens, settings.guidance_scale, use_cache, step, text)
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
    return draw(filter_logits(logits, settings.temperature, settings.top_k, settings.top_p),
                uniform_draws(generators, 1)[0])[:, None]


def sample_tokens(model: TokenTransformer, labels: torch.Tensor, coarse_tokens: torch.Tensor, temperature: float = 1.0,
                  generator: torch.Generator | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
    """Plain sampling with one generator for the batch (training previews)."""
    generator = generator or torch.Generator().manual_seed(0)
    return generate_tokens(model, labels, coarse_tokens, DecodeSettings(temperature=temperature),
                           [generator] * len(labels), text=text)
