#!/usr/bin/env python3
"""Generate images from a qarig export bundle, with numpy and onnxruntime only (no PyTorch, no PIL).

    python runner.py --out-dir generated --num-images 64 --seed 0

This file is copied into every bundle that export.py writes, beside bundle.json (the manifest: the
generator's shapes and sampling settings, and the sha256 of every part), weights.safetensors (the
weights, int8 ones as entropy-coded cluster indices) and one ONNX graph per transformer step, cascade
encoder and image decoder. It runs the cascade level by level, as generate_images.py does: the base
level draws each image's label and condition token, each level samples its tokens one position at a
time with a key/value cache (temperature, top-k, top-p, beam or rank search, classifier-free guidance),
the last level's tokens are looked up in its codebook and decoded to images. It writes images/, grid.png
and a dataset.json whose records hold each image's label and provenance.

Randomness: image i of seed s draws from its own numpy PCG64 stream seeded with s * 1000003 + i, so an
image does not depend on the batch it is in. Given the same uniform numbers, the tokens are those
generate_images.py draws (tests/test_export.py feeds both the same stream)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

FORMAT = 1
MANIFEST = "bundle.json"
SETTINGS = ("temperature", "top_k", "top_p", "search", "beam_width", "num_beam", "guidance_scale", "label")


class BundleError(Exception):
    """A problem with the bundle or the command line: printed as one line, exit code 2."""


# ---------------------------------------------------------------- reading the bundle

def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: not an export bundle")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}, this runner reads {FORMAT}")
    return manifest


def read_part(bundle: Path, manifest: dict, name: str) -> bytes:
    """A part's bytes, checked against the sha256 that the manifest records for it."""
    path = bundle / name
    if not path.is_file():
        raise BundleError(f"{path} is missing from the bundle")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["parts"][name]:
        raise BundleError(f"{path} does not match the sha256 in {MANIFEST}: the part is damaged or was changed")
    return data


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file's bytes (its layout: u64 header length, JSON header, data)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I64": np.int64}
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + length:]
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(body[begin:end], dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])
    return tensors


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Fields of `bits` bits, most significant bit first (core.codec.pack_bits), as integers."""
    fields = np.unpackbits(packed, count=count * bits).reshape(count, bits)
    values = np.zeros(count, dtype=np.uint16)
    for bit in range(bits):  # one column at a time: no (count, bits) integer matrix in memory
        values = (values << 1) | fields[:, bit]
    return values


def decode_weights(stored: dict[str, np.ndarray], specs: dict) -> dict[str, np.ndarray]:
    """Every weight as the graphs and the embeddings take it: float32, or int8 rebuilt from its values and
    its entropy-coded indices, one byte each or packed to `bits` (core.codec.encode_bundle_weights)."""
    weights = {}
    for name, spec in specs.items():
        shape = spec["shape"]
        if spec["dtype"] == "int8":
            indices = np.frombuffer(zlib.decompress(stored[f"{name}.indices"].tobytes()), dtype=np.uint8)
            if "bits" in spec:
                indices = unpack_bits(indices, spec["bits"], int(np.prod(shape)))
            weights[name] = stored[f"{name}.values"][indices].reshape(shape)
        else:
            weights[name] = np.ascontiguousarray(stored[name], dtype=np.float32).reshape(shape)
    return weights


def load_weights(bundle: Path, manifest: dict) -> dict[str, np.ndarray]:
    stored = read_safetensors(read_part(bundle, manifest, "weights.safetensors"))
    try:
        return decode_weights(stored, manifest["weights"])
    except (KeyError, ValueError, IndexError, zlib.error) as e:
        raise BundleError(f"{bundle}/weights.safetensors: damaged weights ({type(e).__name__}: {e})") from None


def session(bundle: Path, manifest: dict, graph: dict, weights: dict[str, np.ndarray], threads: int) -> ort.InferenceSession:
    """An onnxruntime session of one graph, its weights handed over from memory."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # the arena and memory patterns keep the largest batch's buffers
    options.enable_mem_pattern = False
    names = graph["weights"]
    options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names])
    model = read_part(bundle, manifest, graph["file"])
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise BundleError(f"{bundle}/{graph['file']}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- sampling (numpy, as core.models.sampling)

def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted * (1 / shifted.sum(-1, keepdims=True))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def cumsum(probs: np.ndarray) -> np.ndarray:
    """Running sums along the last axis, accumulated in float64 and rounded to float32 (as torch does)."""
    return probs.astype(np.float64).cumsum(-1).astype(np.float32)


def filter_logits(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Logits (B, V) scaled by temperature, with tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(np.float32) / np.float32(max(temperature, 1e-8))
    if 0 < top_k < logits.shape[-1]:
        kth = -np.partition(-logits, top_k - 1, axis=-1)[:, top_k - 1:top_k]
        logits = np.where(logits < kth, -np.inf, logits).astype(np.float32)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(logits, order, -1))
        outside = cumsum(probs) - probs >= top_p
        mask = np.zeros_like(outside)
        np.put_along_axis(mask, order, outside, -1)
        logits = np.where(mask, -np.inf, logits).astype(np.float32)
    return logits


def draw(logits: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """One token per row, by inverting the row's CDF at its uniform number (as core.models.sampling.draw)."""
    cdf = cumsum(softmax(logits))
    targets = (uniforms.astype(np.float32) * cdf[:, -1])[:, None]
    return np.minimum((cdf <= targets).sum(-1), cdf.shape[-1] - 1)


class RandomSource:
    """One stream of uniform numbers in [0, 1) per image of the batch."""

    def __init__(self, seed: int, indices: range):
        self.streams = [np.random.Generator(np.random.PCG64(seed * 1_000_003 + i)) for i in indices]

    def uniform(self, rows: np.ndarray) -> np.ndarray:
        """The next number of each row's stream (rows: image positions in the batch, in draw order)."""
        return np.array([self.streams[r].random(dtype=np.float32) for r in rows], dtype=np.float32)


def draw_from_counts(weights: np.ndarray, uniform: float) -> int:
    cdf = np.cumsum(weights.astype(np.float64))
    return int(min(np.searchsorted(cdf, uniform * cdf[-1], side="right"), len(cdf) - 1))


def window_starts(length: int, window: int) -> list[tuple[int, int]]:
    """(window start, first position it predicts), as core.models.transformer.window_starts."""
    if length <= window:
        return [(0, 0)]
    hop = max(1, window // 2)
    schedule, start = [(0, 0)], 0
    while start + window < length:
        start += hop
        schedule.append((start, start + window - hop))
    return schedule


# ---------------------------------------------------------------- one level of the cascade

class Level:
    """A transformer's step (and encoder) sessions and its embedding tables."""

    def __init__(self, info: dict, weights: dict[str, np.ndarray], sessions: dict):
        self.info, self.weights, self.prefix = info, weights, info["prefix"]
        self.step, self.encoder = sessions["step"], sessions.get("encoder")
        self.cascade = info["kind"] == "cascade"
        self.layers, self.heads, self.head_dim = info["layers"], info["heads"], info["head_dim"]

    def embed(self, table: str, ids: np.ndarray) -> np.ndarray:
        weight = self.weights[f"{self.prefix}{table}.weight"]
        rows = weight[ids]
        if weight.dtype == np.int8:  # int8 table: rows scaled as they are looked up
            scale = self.weights[f"{self.prefix}{table}.weight_scale"]
            return rows.astype(np.float32) * (scale[ids] if len(scale) > 1 else scale)[..., None]
        return rows

    def conditioning(self, labels: np.ndarray, coarse: np.ndarray) -> np.ndarray:
        """Embeddings of [label, coarse tokens...] (B, 1 + S, D)."""
        x = np.concatenate([self.embed("label_emb", labels)[:, None], self.embed("cond_emb", coarse)], 1)
        return x + self.embed("cond_pos", np.arange(coarse.shape[1] + 1))

    def encode(self, cond: np.ndarray) -> dict[str, np.ndarray]:
        names = [f"cross_{kv}.{i}" for i in range(self.layers) for kv in "kv"]
        return dict(zip(names, self.encoder.run(names, {"x": cond})))


class DecodeState:
    """Tokens so far and the key/value cache of the current window, with guidance folded in (rows
    [conditional; unconditional]), as core.models.sampling.DecodeState."""

    def __init__(self, level: Level, labels: np.ndarray, coarse: np.ndarray, guidance_scale: float):
        self.level, self.scale, self.guided = level, guidance_scale, guidance_scale != 1.0
        info = level.info
        if self.guided:
            labels = np.concatenate([labels, np.full_like(labels, info["null_label"])])
            coarse = np.concatenate([coarse, coarse])
        self.cond = level.conditioning(labels, coarse)
        self.cross = level.encode(self.cond) if level.cascade else {}
        self.n, self.start_token = info["fine_len"], info["start_token"]
        self.tokens = np.zeros((len(labels), self.n), dtype=np.int64)
        self.schedule = {first: start for start, first in window_starts(self.n, info["window"])}
        self.start, self.cache, self.filled = 0, {}, 0

    @property
    def batch(self) -> int:
        return len(self.tokens) // 2 if self.guided else len(self.tokens)

    def token_embeddings(self, begin: int, end: int) -> np.ndarray:
        """Decoder inputs for positions [begin, end): the token before each (the start token at 0)."""
        before = self.tokens[:, max(0, begin - 1):end - 1]
        if begin == 0:
            before = np.concatenate([np.full((len(self.tokens), 1), self.start_token), before], 1)
        return self.level.embed("tok_emb", before) + self.level.embed("pos_emb", np.arange(begin, end))

    def reserve(self, needed: int) -> None:
        """Cache room for `needed` positions, grown in steps of 16 (attention reads every slot, masked)."""
        size = next(iter(self.cache.values())).shape[2] if self.cache else 0
        if needed <= size:
            return
        size = -(-needed // 16) * 16
        rows = len(self.tokens)
        for i in range(self.level.layers):
            for kv in "kv":
                grown = np.zeros((rows, self.level.heads, size, self.level.head_dim), dtype=np.float32)
                old = self.cache.get(f"past_{kv}.{i}")
                if old is not None:
                    grown[:, :, :self.filled] = old[:, :, :self.filled]
                self.cache[f"past_{kv}.{i}"] = grown

    def run_step(self, x: np.ndarray) -> np.ndarray:
        """Logits of the last of the new positions x (B, T, D); their keys and values join the cache."""
        t = x.shape[1]
        self.reserve(self.filled + t)
        size = next(iter(self.cache.values())).shape[2]
        mask = np.full((t, size + t), -np.inf, dtype=np.float32)
        mask[:, :self.filled] = 0
        mask[:, size:][np.tril(np.ones((t, t), dtype=bool))] = 0
        outputs = self.level.step.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32), "mask": mask,
                                             **self.cache, **self.cross})
        for i in range(self.level.layers):
            self.cache[f"past_k.{i}"][:, :, self.filled:self.filled + t] = outputs[1 + 2 * i]
            self.cache[f"past_v.{i}"][:, :, self.filled:self.filled + t] = outputs[2 + 2 * i]
        self.filled += t
        return outputs[0]

    def logits_at(self, p: int) -> np.ndarray:
        """Logits (batch, V) for position p, given tokens[:, :p]."""
        if p in self.schedule:  # a new window: the cache is refilled from its start
            self.start, self.filled = self.schedule[p], 0
            x = self.token_embeddings(self.start, p + 1)
            if not self.level.cascade:  # base: [label, condition token] come first
                x = np.concatenate([self.cond, x], 1)
        else:
            x = self.token_embeddings(p, p + 1)
        logits = self.run_step(x).astype(np.float32)
        if self.guided:
            conditional, unconditional = np.split(logits, 2)
            logits = unconditional + np.float32(self.scale) * (conditional - unconditional)
        return logits

    def set(self, p: int, tokens: np.ndarray) -> None:
        self.tokens[:, p] = np.concatenate([tokens, tokens]) if self.guided else tokens

    def select(self, rows: np.ndarray) -> None:
        """Keep (and repeat) batch rows: beams and candidates share their ancestors' caches."""
        if self.guided:
            rows = np.concatenate([rows, rows + self.batch])
        self.tokens, self.cond = self.tokens[rows], self.cond[rows]
        self.cross = {name: value[rows] for name, value in self.cross.items()}
        self.cache = {name: value[rows] for name, value in self.cache.items()}

    def result(self) -> np.ndarray:
        return self.tokens[:self.batch]


def sample(dec: DecodeState, settings: dict, source: RandomSource, rows: np.ndarray, begin: int = 0,
           end: int | None = None, scored: bool = False) -> np.ndarray:
    """Positions [begin, end) drawn one by one; returns the summed log-probability of each row's draws
    (when `scored`: rank search needs it)."""
    end = dec.n if end is None else end
    total = np.zeros(dec.batch, dtype=np.float32)
    for p in range(begin, end):
        logits = dec.logits_at(p)
        if settings["temperature"] <= 0:  # greedy
            tokens = logits.argmax(-1)
        else:
            logits = filter_logits(logits, settings["temperature"], settings["top_k"], settings["top_p"])
            tokens = draw(logits, source.uniform(rows))
        if scored:
            total += log_softmax(logits)[np.arange(len(tokens)), tokens]
        dec.set(p, tokens)
    return total


def beam_search(dec: DecodeState, beams: int) -> np.ndarray:
    batch = dec.batch
    dec.select(np.repeat(np.arange(batch), beams))
    scores = np.zeros((batch, beams), dtype=np.float32)
    scores[:, 1:] = -np.inf  # all beams start equal: expand only the first
    for p in range(dec.n):
        logprobs = log_softmax(dec.logits_at(p))
        vocab = logprobs.shape[-1]
        candidates = (scores[:, :, None] + logprobs.reshape(batch, beams, vocab)).reshape(batch, -1)
        flat = np.argsort(-candidates, axis=-1, kind="stable")[:, :beams]
        scores = np.take_along_axis(candidates, flat, -1)
        dec.select((flat // vocab + np.arange(batch)[:, None] * beams).reshape(-1))
        dec.set(p, (flat % vocab).reshape(-1))
    dec.select(scores.argmax(-1) + np.arange(batch) * beams)
    return dec.result()


def sample_and_rank(dec: DecodeState, settings: dict, source: RandomSource) -> np.ndarray:
    """For each chunk of beam_width tokens, num_beam candidate chunks drawn, the most probable kept."""
    batch, candidates = dec.batch, settings["num_beam"]
    rows = np.repeat(np.arange(batch), candidates)
    for begin in range(0, dec.n, settings["beam_width"]):
        dec.select(rows)
        scores = sample(dec, settings, source, rows, begin, min(dec.n, begin + settings["beam_width"]), scored=True)
        dec.select(scores.reshape(batch, candidates).argmax(-1) + np.arange(batch) * candidates)
    return dec.result()


def search_mode(settings: dict) -> str:
    if settings["search"] == "auto":
        return "rank" if settings["num_beam"] > 1 else "sample"
    return settings["search"]


def generate_tokens(level: Level, labels: np.ndarray, coarse: np.ndarray, settings: dict,
                    source: RandomSource) -> np.ndarray:
    """The level's tokens (B, fine_len) for label ids (B,) and conditioning tokens (B, coarse_len)."""
    dec = DecodeState(level, labels, coarse, settings["guidance_scale"])
    mode = search_mode(settings)
    if mode == "beam":
        return beam_search(dec, settings["beam_width"])
    if mode == "rank":
        return sample_and_rank(dec, settings, source)
    sample(dec, settings, source, np.arange(len(labels)))
    return dec.result()


# ---------------------------------------------------------------- the generator

def resolve_label(value, names: list[str], where: str) -> int | None:
    """None: drawn per image; -1: unconditional; else the label's index (as core.stages.generate)."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() == "none":
        return -1
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    known = ", ".join(names) if names else "none: the model is unconditional"
    raise BundleError(f"{where}: unknown label {json.dumps(value)} (labels: {known})")


def unpatchify(patches: np.ndarray, shape: list[int], patch: list[int]) -> np.ndarray:
    """(N, L, ph*pw*C) -> (N, C, H, W), as core.models.codebook.unpatchify."""
    (c, h, w), (ph, pw) = shape, patch
    x = patches.reshape(len(patches), h // ph, w // pw, ph, pw, c)
    return x.transpose(0, 5, 1, 3, 2, 4).reshape(len(patches), c, h, w)


class Generator:
    """The whole bundle: every level, the codebook of the last, the decoder."""

    def __init__(self, bundle: Path, threads: int = 0):
        self.bundle = bundle
        self.manifest = manifest = read_manifest(bundle)
        weights = load_weights(bundle, manifest)
        graphs = [graph for info in manifest["levels"] for graph in info["graphs"].values()] + [manifest["decoder"]["graph"]]
        sessions = {graph["file"]: session(bundle, manifest, graph, weights, threads) for graph in graphs}
        for name in {name for graph in graphs for name in graph["weights"]}:
            del weights[name]  # each session holds its own copy; numpy keeps the embeddings and the codebook
        self.levels = [Level(info, weights, {role: sessions[graph["file"]] for role, graph in info["graphs"].items()})
                       for info in manifest["levels"]]
        self.decoder = sessions[manifest["decoder"]["graph"]["file"]]
        self.units = weights["codebook/units"]
        self.cond_counts = weights["level0/cond_counts"]
        self.settings = [dict(level["settings"]) for level in manifest["levels"]]

    def use_config(self, path: Path) -> None:
        """Sampling settings from a generation config of generate_images.py's format (paths are ignored:
        the bundle holds the models)."""
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"{path}: unreadable generation config ({e})") from None
        if not isinstance(config, dict) or sorted(config) != [str(i) for i in range(len(self.levels))]:
            raise BundleError(f"{path}: expected levels \"0\" to \"{len(self.levels) - 1}\", as the bundle has")
        for i, level in enumerate(self.settings):
            level.update({key: config[str(i)][key] for key in SETTINGS if key in config[str(i)]})

    def draw_conditions(self, source: RandomSource, count: int) -> tuple[list[int], np.ndarray]:
        """Each image's label (-1: none) and condition token, drawn from the base model's training counts."""
        info = self.manifest["levels"][0]
        names, num_labels, counts = info["label_names"], info["num_labels"], self.cond_counts
        wanted = resolve_label(self.settings[0]["label"], names, "level 0")
        frequencies = counts[:num_labels].sum(1) + 1e-9
        if info.get("drawn_labels") is not None:  # a tuned model makes the labels it was tuned on
            mask = np.zeros(num_labels, dtype=bool)
            mask[info["drawn_labels"]] = True
            frequencies = np.where(mask, frequencies, 0)
        labels = []
        for row in range(count):
            if wanted is None and num_labels:
                labels.append(draw_from_counts(frequencies, source.uniform([row])[0]))
            else:
                labels.append(-1 if wanted is None else wanted)
        conds = [draw_from_counts(counts[label if label >= 0 else num_labels] + 1e-9, source.uniform([row])[0])
                 for row, label in enumerate(labels)]
        return labels, np.array(conds, dtype=np.int64)[:, None]

    def tokens(self, labels: list[int], cond: np.ndarray, source: RandomSource) -> np.ndarray:
        """The last level's tokens, level by level from the condition tokens."""
        names = self.manifest["levels"][0]["label_names"]
        tokens = cond
        for i, (level, settings) in enumerate(zip(self.levels, self.settings)):
            override = resolve_label(settings["label"], names, f"level {i}") if i else None
            ids = np.array([label if label >= 0 else level.info["null_label"]
                            for label in (labels if override is None else [override] * len(labels))], dtype=np.int64)
            tokens = generate_tokens(level, ids, tokens, settings, source)
        return tokens

    def images(self, tokens: np.ndarray, chunk: int = 16) -> np.ndarray:
        """Tokens of the last level -> uint8 images (B, C, H, W), decoded `chunk` at a time (the decoder's
        activations are the largest tensors of the run)."""
        book = self.manifest["decoder"]
        fmaps = unpatchify(self.units[tokens], book["fmap_shape"], book["patch"]).astype(np.float32)
        images = np.concatenate([self.decoder.run(["images"], {"fmaps": fmaps[i:i + chunk]})[0]
                                 for i in range(0, len(fmaps), chunk)])
        images = np.clip(np.round((np.clip(images, -1, 1) + 1) * 127.5), 0, 255).astype(np.uint8)
        if book.get("crop"):  # back at the source's size: the padding the dataset build added goes
            width, height = book["crop"]
            top, left = (images.shape[-2] - height) // 2, (images.shape[-1] - width) // 2
            images = images[..., top:top + height, left:left + width]
        return images

    def generate_batch(self, indices: range, seed: int) -> tuple[np.ndarray, list[int]]:
        source = RandomSource(seed, indices)
        labels, cond = self.draw_conditions(source, len(indices))
        return self.images(self.tokens(labels, cond, source)), labels


# ---------------------------------------------------------------- writing the images and dataset.json

def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image (C, H, W), C = 1 or 3, as PNG bytes (8-bit grey or RGB, no filter)."""
    channels, height, width = image.shape
    rows = np.ascontiguousarray(image.transpose(1, 2, 0)).reshape(height, width * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """uint8 images (N, C, H, W) tiled on black, each framed by one pixel (as core.pictures.tile)."""
    n, c, h, w = images.shape
    rows = max(1, -(-n // columns))
    canvas = np.zeros((c, rows * (h + 2), columns * (w + 2)), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = image
    return canvas


def write_dataset_json(path: Path, records: list[dict], info: dict, run: dict) -> None:
    """The records in tinydb's layout, as core.stages.generate writes them: one small record per image,
    the run's provenance once in the table "runs"."""
    table = {str(i + 1): record for i, record in enumerate(records)}
    write_atomic(path, json.dumps({"_default": table, "info": {"1": info}, "runs": {"1": run}}).encode())


def image_path(index: int) -> str:
    """Where image `index` lies, relative to the out dir: 1,000 images per folder (as generate_images.py)."""
    return f"images/{index // 1000:03d}/{index:06d}.png"


def provenance(generator: Generator, seed: int) -> dict:
    """What made the images: the source artifacts (sha256), the settings used, this bundle and runtime."""
    source = generator.manifest["provenance"]
    levels = [{**record, **settings} for record, settings in zip(source["levels"], generator.settings)]
    bundle_sha = hashlib.sha256((generator.bundle / MANIFEST).read_bytes()).hexdigest()
    return {"seed": seed, "levels": levels, "decoder": source["decoder"],
            "export": {"bundle_sha256": bundle_sha, "runtime": f"onnxruntime {ort.__version__}",
                       "rng": "numpy PCG64, seed * 1000003 + index"}}


def run(bundle: Path, out_dir: Path, num_images: int, seed: int, batch_size: int, config_path: Path | None,
        overwrite: bool, threads: int) -> Path:
    if (out_dir / "dataset.json").exists() and not overwrite:
        raise BundleError(f"{out_dir} already holds generated images; use --overwrite to replace them")
    generator = Generator(bundle, threads)
    if config_path is not None:
        generator.use_config(config_path)
    names = generator.manifest["levels"][0]["label_names"]
    made = provenance(generator, seed)
    records, first = [], []
    for start in range(0, num_images, batch_size):
        indices = range(start, min(num_images, start + batch_size))
        images, labels = generator.generate_batch(indices, seed)
        for index, image, label in zip(indices, images, labels):
            write_atomic(out_dir / image_path(index), png_bytes(image))
            records.append({"image_fpath": image_path(index), "labels": [names[label]] if label >= 0 else [],
                            "split": "train", "index": index, "run": 1})
        first.extend(images[:max(0, 64 - len(first))])
    write_atomic(out_dir / "grid.png", png_bytes(grid(np.stack(first))))
    c, size = first[0].shape[0], first[0].shape[-1]
    info = {"kind": "generated", "channels": c, "size": size, "images": num_images}
    write_dataset_json(out_dir / "dataset.json", records, info,
                       {**made, "format": "png", "num_images": num_images, "batch_size": batch_size})
    return out_dir / "dataset.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="where to write images/, grid.png, dataset.json")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--config-path", type=Path, help="a generation config: its sampling settings replace the bundle's")
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent, help="the bundle folder")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.num_images < 1 or args.batch_size < 1:
            raise BundleError("--num-images and --batch-size must be at least 1")
        path = run(args.bundle, args.out_dir, args.num_images, args.seed, args.batch_size, args.config_path,
                   args.overwrite, args.threads)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"wrote {args.num_images} images, {args.out_dir / 'grid.png'} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
