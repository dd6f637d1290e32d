"""Captions as token ids, and the small text encoder that reads them (trained from scratch with the transformer
it conditions, as miniGLIDE's is).

The Tokenizer is word-level: a caption is lower-cased and cut into runs of letters and digits ("a striped
short-sleeved dress" -> a, striped, short, sleeved, dress). Its vocabulary is the words of the training
captions, stored as a JSON list in the model's artifact (no pickle). Every caption becomes `length` ids:
its words, then padding. Id 0 pads, id 1 stands for "no caption" (the null caption of classifier-free
guidance, and of captions dropped in training); known words follow, in sorted order. A prompt word the
vocabulary does not hold is refused (see Tokenizer.problem), never silently dropped."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn

WORD = re.compile(r"[a-z0-9]+")
PAD, NULL = 0, 1
FIRST_WORD = 2


def words(caption: str) -> list[str]:
    return WORD.findall(caption.lower())


@dataclass
class Tokenizer:
    vocab: list[str]  # known words; word i has id FIRST_WORD + i
    length: int  # ids per caption: the longest training caption's words (at most the config's cap)

    @classmethod
    def build(cls, captions: list[str | None], most_words: int) -> "Tokenizer":
        """The words of the given (training) captions; captions longer than `most_words` are cut there."""
        split = [words(c) for c in captions if c]
        vocab = sorted({w for ws in split for w in ws})
        return cls(vocab, max(1, min(most_words, max((len(ws) for ws in split), default=1))))

    @property
    def size(self) -> int:
        """Ids in use: padding, null, and the words."""
        return FIRST_WORD + len(self.vocab)

    def null(self) -> list[int]:
        return [NULL] + [PAD] * (self.length - 1)

    def encode(self, caption: str | None, lenient: bool = False) -> list[int]:
        """The caption's ids; None or an empty caption is the null caption. Words past `length` are cut.
        An unknown word raises KeyError, or with `lenient` (training captions of a model fine-tuned on
        new data) is left out."""
        if not caption or not words(caption):
            return self.null()
        known = [w for w in words(caption) if w in self.index or not lenient]
        ids = [FIRST_WORD + self.index[w] for w in known[:self.length]]
        return ids + [PAD] * (self.length - len(ids)) if ids else self.null()

    def encode_all(self, captions: list[str | None], lenient: bool = False) -> torch.Tensor:
        """(N, length) ids."""
        return torch.tensor([self.encode(c, lenient) for c in captions], dtype=torch.long).view(-1, self.length)

    def problem(self, prompt: str) -> str | None:
        """Why a prompt cannot be read, in one line (unknown words with the nearest known ones, or too
        many words), or None."""
        found = words(prompt)
        if not found:
            return "it has no words (give null for no prompt)"
        unknown = [w for w in dict.fromkeys(found) if w not in self.index]
        if unknown:
            parts = []
            for word in unknown:
                near = difflib.get_close_matches(word, self.vocab, n=3, cutoff=0.5)
                parts.append(f"'{word}' (nearest known: {', '.join(repr(n) for n in near)})" if near else f"'{word}'")
            shown = ", ".join(self.vocab[:30]) + (", ..." if len(self.vocab) > 30 else "")
            return (f"unknown word{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; the model knows the "
                    f"{len(self.vocab)} words of its training captions: {shown}")
        if len(found) > self.length:
            return f"it has {len(found)} words; the model reads at most {self.length}"
        return None

    @cached_property
    def index(self) -> dict[str, int]:
        """Each known word's position in the vocabulary."""
        return {w: i for i, w in enumerate(self.vocab)}

    def to_record(self) -> dict:
        return {"vocab": list(self.vocab), "length": self.length}

    @classmethod
    def from_record(cls, record: dict) -> "Tokenizer":
        return cls(list(record["vocab"]), int(record["length"]))


class TextEncoder(nn.Module):
    """Token states (B, length, dim) of caption ids: word and position embeddings through a few
    bidirectional transformer blocks (`blocks`, made by the caller so that they are the model's own
    kind), then a layer norm. Padding is an ordinary token: every caption has the same length, so the
    model learns to read past it."""

    def __init__(self, vocab_size: int, length: int, dim: int, blocks: list[nn.Module]):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(blocks)
        self.ln = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x)
