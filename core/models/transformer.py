"""Transformers over codebook tokens, read top to bottom: attention, the block, the model.

base (decoder-only):   [label, condition token, start, t0, t1, ...] -> next token, causal.
cascade (enc-dec):     the encoder reads [label, coarse tokens] with full attention; the decoder reads
                       [start, t0, t1, ...] of the finer level, causal, with cross-attention.

A model trained on captions (its shape holds a tokenizer) also has a text encoder (core.models.text), whose
token states come first: base [caption states, label, condition token, start, ...], where a head reads the
label's position to predict the condition token itself (a caption fixes what that coarse token says);
cascade: the encoder reads [caption states, label, coarse tokens]. A model without captions has none of
this, and is the same model, with the same initial weights, as before captions existed.

Long sequences train on random windows of `sliding_window` tokens; every token carries the embedding
of its absolute position, so the model knows where the window lies. The conditioning (label and
condition token, or the encoder's output) is visible from every window."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.config import ema_decay_option, option, patience_option
from core.models.text import Tokenizer, TextEncoder

ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}
TUNE_SCOPES = ("all", "upper", "conditioning", "auto")
# tune_scope auto: fewer original training images than this per tuned label tune the conditioning alone
AUTO_CONDITIONING_BELOW = 50


@dataclass
class TransformerConfig:
    model_lr: float = option(1e-3, low=1e-7, high=1.0)
    use_sliding_window: bool = option(False)
    sliding_window: int = option(256, low=2, high=1 << 20, doc="decoder tokens per training window")
    num_enc_layers: int = option(2, low=0, high=256)
    num_dec_layers: int = option(4, low=1, high=256)
    self_attn_heads: int = option(4, low=1, high=1024)
    cross_attn_heads: int = option(4, low=1, high=1024)
    in_dim: int = option(128, low=8, high=65536)
    hidden_dim: int = option(512, low=8, high=262144)
    hidden_activation: str = option("silu", choices=tuple(ACTIVATIONS))
    dropout: float = option(0.0, low=0.0, high=0.9)
    label_dropout: float = option(0.1, low=0.0, high=1.0, doc="share of labels replaced by the null label")
    augment_condition: bool = option(False, doc="the conditioning says whether a training map is an augmented copy; "
                                                "sampling always asks for an original, so the augmentation does "
                                                "not leak into the images")
    label_smoothing: float = option(0.0, low=0.0, high=0.5, doc="label smoothing of the training loss")
    tune_scope: str = option("all", choices=TUNE_SCOPES,
                             doc="tuning from another model (--init-from) trains: all (every weight), upper (the "
                                 "label and augmentation rows, the upper half of the decoder, its norm and head), "
                                 "conditioning (the label and augmentation rows alone), or auto (conditioning with "
                                 f"fewer than {AUTO_CONDITIONING_BELOW} training images per tuned label, else upper)")
    warmup_steps: int = option(100, low=0, high=10**7)
    weight_decay: float = option(0.01, low=0.0, high=1.0)
    ema_decay: float = ema_decay_option()
    patience_steps: int = patience_option()
    text_encoder: str = option("scratch", choices=("scratch", "none"),
                               doc="when the data has captions: scratch (a text encoder trained with the model) "
                                   "or none (captions ignored)")
    text_layers: int = option(2, low=0, high=64, doc="blocks of the text encoder")
    max_caption_words: int = option(32, low=1, high=4096, doc="words of a caption read (longer ones are cut)")
    caption_dropout: float = option(0.1, low=0.0, high=0.5,
                                    doc="share of items trained unconditionally (null caption and null label), "
                                        "and share of the others whose caption alone is dropped")

    def check(self) -> str | None:
        for name in ("self_attn_heads", "cross_attn_heads"):
            if self.in_dim % getattr(self, name):
                return f"in_dim ({self.in_dim}) must be a multiple of {name} ({getattr(self, name)})"
        return None


TEXT_KEYS = ("text_encoder", "text_layers", "max_caption_words", "caption_dropout")


def config_record(cfg: TransformerConfig, shape: "TokenShape") -> dict:
    """The config as artifacts and runs store it: without the text settings when the model reads no
    captions, so that such a model's artifact is what it was before captions existed."""
    record = asdict(cfg)
    return record if shape.text is not None else {k: v for k, v in record.items() if k not in TEXT_KEYS}


@dataclass
class TokenShape:
    """What the data and codebooks fix about a model (stored in its artifact beside the config). The
    coarse level conditions the model (base: the whole-map condition codebook); the fine level is the
    one it predicts."""
    kind: str  # "base" or "cascade"
    coarse_vocab: int  # units of the coarse level's codebook
    fine_vocab: int  # units of the fine level's codebook
    coarse_len: int  # tokens per image in the coarse level (base: 1)
    fine_len: int  # tokens per image in the fine level
    num_labels: int = 0  # 0: unconditional
    label_names: list = field(default_factory=list)
    text: dict | None = None  # the tokenizer's record (core.models.text.Tokenizer) of a model trained on captions

    # artifacts store the shape under the seed's low/high-resolution names
    STORED_NAMES = {"coarse_vocab": "lr_vocab", "fine_vocab": "hr_vocab", "coarse_len": "lr_len", "fine_len": "hr_len"}

    def to_record(self) -> dict:
        return {self.STORED_NAMES.get(k, k): v for k, v in asdict(self).items() if k != "text" or v is not None}

    @classmethod
    def from_record(cls, record: dict) -> "TokenShape":
        stored = {v: k for k, v in cls.STORED_NAMES.items()}
        return cls(**{stored.get(k, k): v for k, v in record.items()})

    @property
    def null_label(self) -> int:
        return self.num_labels

    @property
    def start_token(self) -> int:
        return self.fine_vocab

    @property
    def tokenizer(self) -> Tokenizer | None:
        return Tokenizer.from_record(self.text) if self.text is not None else None


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask of `shape`, each entry True with probability 1 - p (to within 1/65536): each 64-bit random
    word gives four 16-bit draws. torch's CPU bernoulli draws a number per entry, which took a tenth of a
    transformer training step."""
    n = shape.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return (words.view(torch.int16)[:n] >= round(p * 65536) - 32768).view(shape)


def dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of `x` at rate p (training), with keep_mask's draws."""
    return torch.where(keep_mask(x.shape, p, x.device), x * (1 / (1 - p)), 0) if p > 0 else x


class Dropout(nn.Dropout):
    """nn.Dropout, whose mask on the CPU comes from keep_mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu":
            return dropped(x, self.p)
        return super().forward(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, causal: bool,
           dropout_p: float) -> torch.Tensor:
    """Scaled dot-product attention over (B, heads, T, head_dim). A CPU training step takes the plain
    computation with keep_mask's dropout: with torch's fused CPU kernel, whose dropout falls back to a slow path,
    a tiny cascade's training step took 0.333 s against 0.230 (2 threads). Otherwise (no gradient, or another
    device) the fused kernel."""
    if not (torch.is_grad_enabled() and q.device.type == "cpu" and (q.requires_grad or k.requires_grad)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return dropped(scores.softmax(-1).to(v.dtype), dropout_p) @ v


class Attention(nn.Module):
    """Multi-head attention; optional cache of past keys and values."""

    def __init__(self, dim: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        self.heads, self.dropout, self.cross = heads, dropout, cross
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(source).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None, causal: bool = False,
                cache: dict | None = None) -> torch.Tensor:
        q = self.split_heads(self.q(x))
        if self.cross:  # keys and values of the encoder output: computed once per sequence when cached
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self.keys_values(source)
                if cache is not None:
                    cache["k"], cache["v"] = k, v
            mask = None
        else:
            k, v = self.keys_values(x)
            past = 0
            if cache is not None:
                if "k" in cache:
                    past = cache["k"].shape[2]
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                cache["k"], cache["v"] = k, v
            mask = None
            if causal and past > 0 and q.shape[2] > 1:  # query i sits at position past + i
                rows = torch.arange(q.shape[2], device=x.device)[:, None] + past
                mask = torch.arange(k.shape[2], device=x.device)[None, :] <= rows
        is_causal = causal and not self.cross and mask is None and q.shape[2] > 1
        y = attend(q, k, v, mask=mask, causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
        b, h, t, hd = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, h * hd))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, causal: bool, cross: bool):
        super().__init__()
        self.causal = causal
        self.ln1 = nn.LayerNorm(cfg.in_dim)
        self.attn = Attention(cfg.in_dim, cfg.self_attn_heads, cfg.dropout, cross=False)
        self.ln_cross = nn.LayerNorm(cfg.in_dim) if cross else None
        self.cross = Attention(cfg.in_dim, cfg.cross_attn_heads, cfg.dropout, cross=True) if cross else None
        self.ln2 = nn.LayerNorm(cfg.in_dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.in_dim, cfg.hidden_dim), ACTIVATIONS[cfg.hidden_activation](),
                                 nn.Linear(cfg.hidden_dim, cfg.in_dim), Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=self.causal, cache=None if cache is None else cache.setdefault("self", {}))
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), memory, cache=None if cache is None else cache.setdefault("cross", {}))
        return x + self.mlp(self.ln2(x))


class TokenTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, shape: TokenShape):
        super().__init__()
        self.cfg, self.shape = cfg, shape
        self.use_checkpointing = False
        dim = cfg.in_dim
        cascade = shape.kind == "cascade"
        self.label_emb = nn.Embedding(shape.num_labels + 1, dim)  # the last entry is the null label
        self.cond_emb = nn.Embedding(shape.coarse_vocab, dim)  # base: condition token; cascade: coarse tokens
        self.cond_pos = nn.Embedding(shape.coarse_len + 1, dim)  # label, then conditioning tokens
        self.tok_emb = nn.Embedding(shape.fine_vocab + 1, dim)  # the predicted level's units and a start token
        self.pos_emb = nn.Embedding(shape.fine_len, dim)  # absolute positions: the window's place in the image
        self.encoder = nn.ModuleList(Block(cfg, causal=False, cross=False)
                                     for _ in range(cfg.num_enc_layers if cascade else 0))
        self.enc_ln = nn.LayerNorm(dim) if cascade else None
        self.decoder = nn.ModuleList(Block(cfg, causal=True, cross=cascade) for _ in range(cfg.num_dec_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, shape.fine_vocab, bias=False)
        self.tokenizer = shape.tokenizer
        if self.tokenizer is not None:  # made last, so that a model without captions starts as it always did
            self.text_encoder = TextEncoder(self.tokenizer.size, self.tokenizer.length, dim,
                                            [Block(cfg, causal=False, cross=False) for _ in range(cfg.text_layers)])
            self.cond_head = nn.Linear(dim, shape.coarse_vocab, bias=False) if not cascade else None
        # row 0: an original map, row 1: an augmented copy (made last, as the text encoder)
        self.augment_emb = nn.Embedding(2, dim) if cfg.augment_condition else None
        self.apply(self._init_weights)

    def freeze_for_tuning(self, scope: str) -> None:
        """Stop the gradients of the weights that tuning in `scope` (TUNE_SCOPES, auto resolved) keeps as they
        were."""
        if scope == "all":
            return
        tuned = [self.label_emb] + ([self.augment_emb] if self.augment_emb is not None else [])
        if scope == "upper":
            tuned += list(self.decoder[len(self.decoder) // 2:]) + [self.ln_f, self.head]
        self.requires_grad_(False)
        for module in tuned:
            module.requires_grad_(True)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def text_len(self) -> int:
        """Caption states at the start of the conditioning (0 without captions)."""
        return self.tokenizer.length if self.tokenizer is not None else 0

    @property
    def prefix_len(self) -> int:
        """Decoder positions before the first predicted token's input: [caption, label, condition] for base."""
        return self.text_len + 2 if self.shape.kind == "base" else 0

    def null_text(self, batch: int, device: torch.device) -> torch.Tensor:
        """The ids of `batch` null captions (batch, text_len)."""
        return torch.tensor(self.tokenizer.null(), device=device).expand(batch, -1)

    def label_embeddings(self, labels: torch.Tensor, augmented: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D): each label's embedding, with the augmentation condition's when the model has one (`augmented`
        (B,) 0/1; None, as at sampling and evaluation: every item an original)."""
        x = self.label_emb(labels)
        if self.augment_emb is None:
            return x
        return x + self.augment_emb(torch.zeros_like(labels) if augmented is None else augmented)

    def conditioning(self, labels: torch.Tensor, coarse_tokens: torch.Tensor, text: torch.Tensor | None = None,
                     augmented: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of [caption states..., label, lr tokens...]: (B, text_len + 1 + coarse_len, D). `text`
        (B, text_len): caption ids; None is the null caption. `augmented`: see label_embeddings."""
        positions = torch.arange(coarse_tokens.shape[1] + 1, device=coarse_tokens.device)
        x = torch.cat([self.label_embeddings(labels, augmented)[:, None], self.cond_emb(coarse_tokens)], 1)
        x = x + self.cond_pos(positions)
        if self.tokenizer is None:
            return x
        return torch.cat([self.caption_states(labels, text), x], 1)

    def caption_states(self, labels: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        text = self.null_text(len(labels), labels.device) if text is None else text
        return self.text_encoder(text)

    def encode(self, labels: torch.Tensor, coarse_tokens: torch.Tensor, text: torch.Tensor | None = None,
               augmented: torch.Tensor | None = None) -> torch.Tensor | None:
        """Cascade: the encoder's output (the decoder's memory). Base: None."""
        if self.shape.kind == "base":
            return None
        x = self.conditioning(labels, coarse_tokens, text, augmented)
        for block in self.encoder:
            x = self._run(block, x)
        return self.enc_ln(x)

    def forward(self, labels: torch.Tensor, coarse_tokens: torch.Tensor, fine_input: torch.Tensor,
                positions: torch.Tensor, memory: torch.Tensor | None = None, caches: list | None = None,
                with_prefix: bool = True, text: torch.Tensor | None = None, with_condition: bool = False,
                augmented: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, fine_vocab) for the decoder inputs `fine_input` (B, T) at absolute `positions` (B, T).
        fine_input[:, i] is the token before position i (the start token at position 0). `memory` may
        carry a precomputed encoder output; `caches` (one dict per decoder block) keep keys and values
        between calls, and `with_prefix` False means the prefix is already in the caches. `text`: caption
        ids (models trained on captions; None: the null caption). `with_condition` (a base model with
        captions): also the condition token's logits (B, coarse_vocab), read at the label's position.
        `augmented` (training a model with the augmentation condition): which items are augmented copies."""
        x = self.tok_emb(fine_input) + self.pos_emb(positions)
        if self.shape.kind == "base" and with_prefix:
            x = torch.cat([self.conditioning(labels, coarse_tokens, text, augmented), x], 1)
        if self.shape.kind == "cascade" and memory is None:
            memory = self.encode(labels, coarse_tokens, text, augmented)
        for i, block in enumerate(self.decoder):
            x = self._run(block, x, memory, None if caches is None else caches[i])
        if self.shape.kind == "base" and with_prefix:
            condition = x[:, self.text_len]  # the label's position, which sees the caption and the label
            x = x[:, self.prefix_len:]
        logits = self.head(self.ln_f(x))
        return (logits, self.cond_head(self.ln_f(condition))) if with_condition else logits

    def condition_logits(self, labels: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        """A base model with captions: logits (B, coarse_vocab) of the condition token given the caption and
        the label, from the decoder run over [caption states, label] alone (causal: what the full
        sequence gives at the label's position)."""
        x = torch.cat([self.caption_states(labels, text), self.label_embeddings(labels)[:, None] + self.cond_pos.weight[0]], 1)
        for block in self.decoder:
            x = block(x)
        return self.cond_head(self.ln_f(x[:, -1]))

    def _run(self, block: Block, x: torch.Tensor, memory: torch.Tensor | None = None, cache: dict | None = None):
        if self.use_checkpointing and self.training and cache is None:
            return checkpoint(block, x, memory, use_reentrant=False)
        return block(x, memory, cache)

    def window(self) -> int:
        return sequence_window(self.cfg, self.shape.fine_len)


def sequence_window(cfg: TransformerConfig, length: int) -> int:
    """Decoder tokens read at once: the sliding window, or the whole sequence when there is no window or
    the window is longer than the sequence (the seed's meaning: no sliding needed)."""
    return min(cfg.sliding_window, length) if cfg.use_sliding_window else length


def decoder_input(fine_tokens: torch.Tensor, start_token: int) -> torch.Tensor:
    """[start, t0, ..., t_{n-2}]: what the decoder reads to predict [t0, ..., t_{n-1}]."""
    start = torch.full_like(fine_tokens[:, :1], start_token)
    return torch.cat([start, fine_tokens[:, :-1]], 1)


def window_starts(length: int, window: int) -> list[tuple[int, int]]:
    """The fixed schedule by which a sequence longer than the window is read at evaluation and sampling:
    (window start, first position this window predicts). Windows hop by half their length, and a
    position is predicted by the first window in which it is preceded by at least half a window
    (or by all of the sequence before it), as in the random windows of training."""
    if length <= window:
        return [(0, 0)]
    hop = max(1, window // 2)
    schedule, start = [(0, 0)], 0
    while start + window < length:
        start += hop
        schedule.append((start, start + window - hop))
    return schedule


def sequence_logits(model: TokenTransformer, labels: torch.Tensor, coarse_tokens: torch.Tensor,
                    fine_tokens: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
    """Logits for every position of whole sequences (B, n, vocab), without a cache, reading each
    position in the window the schedule gives it. The reference that cached sampling must match."""
    n, window = fine_tokens.shape[1], model.window()
    inputs = decoder_input(fine_tokens, model.shape.start_token)
    memory = model.encode(labels, coarse_tokens, text)
    positions = torch.arange(n, device=fine_tokens.device).expand(len(fine_tokens), n)
    pieces = []  # window k predicts [first_k, end_k), and these tile [0, n)
    for start, first in window_starts(n, window):
        end = min(n, start + window)
        logits = model(labels, coarse_tokens, inputs[:, start:end], positions[:, start:end], memory=memory, text=text)
        pieces.append(logits[:, first - start:])
    return torch.cat(pieces, 1)
