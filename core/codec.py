"""The encoding of compressed weights in an artifact (written by compress.py, read by every loader).

For each clustered tensor `name` the artifact stores `name.indices` (cluster indices packed to the bits
the number of clusters needs, then deflated unless entropy coding is off), `name.centroids` (int8, one
per cluster) and `name.scale` (float, one per tensor or per output channel): the weight is
centroids[indices] * scale. The other tensors are kept (as float16 with float16_rest). The artifact's
extra["compression"] describes this."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from core.errors import PipelineError

FORMAT = 1


def index_bits(clusters: int) -> int:
    return max(1, (clusters - 1).bit_length())


def pack_bits(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices (< 2**bits) as a stream of `bits`-bit fields, most significant bit first, in uint8."""
    values = indices.flatten().numpy().astype(np.uint16)
    fields = (values[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint16)) & 1
    return torch.from_numpy(np.packbits(fields.astype(np.uint8).reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    fields = np.unpackbits(packed.numpy(), count=count * bits).reshape(count, bits).astype(np.int64)
    return torch.from_numpy(fields @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64)))


def encode_tensors(rest: dict[str, torch.Tensor], codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   *, clusters: int, per_channel: bool, entropy_coding: bool,
                   float16_rest: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The artifact's tensors and its extra["compression"]. `codes` maps each clustered tensor's name to
    (indices, int8 centroids, scale per row); `rest` holds every other tensor the artifact keeps."""
    bits = index_bits(clusters)
    out, shapes = {}, {}
    for name, (indices, centroids, scale) in codes.items():
        packed = pack_bits(indices, bits)
        if entropy_coding:
            packed = torch.from_numpy(np.frombuffer(zlib.compress(packed.numpy().tobytes(), 9), dtype=np.uint8).copy())
        if float16_rest:
            scale = scale.half()
        out[f"{name}.indices"], out[f"{name}.centroids"], out[f"{name}.scale"] = packed, centroids, scale
        shapes[name] = list(indices.shape)
    halved = []
    for name, t in rest.items():
        if float16_rest and t.dtype == torch.float32:
            t = t.half()
            halved.append(name)
        out[name] = t
    info = {"format": FORMAT, "clusters": clusters, "bits": bits,
            "coding": "deflate" if entropy_coding else "packed", "per_channel": per_channel,
            "tensors": shapes, "float16": halved}
    return out, info


def int8_weights(tensors: dict[str, torch.Tensor], info: dict, source: str | Path
                 ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A compressed artifact's tensors as they run in int8: (the other tensors, in float32; each clustered
    weight as (int8 tensor centroids[indices], float scale per row or one))."""
    if info.get("format") != FORMAT:
        raise PipelineError(f"{source}: unsupported compression format {info.get('format')!r} (this tool reads {FORMAT})")
    rest, weights = dict(tensors), {}
    try:
        for name, shape in info["tensors"].items():
            packed = rest.pop(f"{name}.indices")
            if info["coding"] == "deflate":
                packed = torch.from_numpy(np.frombuffer(zlib.decompress(packed.numpy().tobytes()), dtype=np.uint8).copy())
            indices = unpack_bits(packed, info["bits"], int(np.prod(shape))).view(shape)
            centroids, scale = rest.pop(f"{name}.centroids"), rest.pop(f"{name}.scale").float()
            if centroids.dtype != torch.int8 or scale.numel() not in (1, shape[0]):
                raise ValueError(f"{name}: centroids of {centroids.dtype}, {scale.numel()} scales for {shape[0]} rows")
            weights[name] = (centroids[indices], scale)
        for name in info.get("float16", []):
            rest[name] = rest[name].float()
    except (KeyError, ValueError, RuntimeError, IndexError, zlib.error) as e:
        raise PipelineError(f"{source}: damaged compressed artifact ({type(e).__name__}: {e})") from None
    return rest, weights


def decode_tensors(tensors: dict[str, torch.Tensor], info: dict, source: str | Path) -> dict[str, torch.Tensor]:
    """Float tensors of a compressed artifact: each clustered weight rebuilt as centroids[indices] * scale."""
    rest, weights = int8_weights(tensors, info, source)
    return {**rest, **{name: dequantize(weight, scale) for name, (weight, scale) in weights.items()}}


def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An int8 weight times its scale per row (dim 0), or its one scale, in float32."""
    return weight.float() * scale.float().view(-1, *([1] * (weight.dim() - 1)))


# ---------------------------------------------------------------- the export bundle's weights

def encode_bundle_weights(weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors of an export bundle's weights file, and how the runner restores each (runner/runner.py,
    decode_weights). An int8 tensor is stored as its distinct values (at most 256; as many as the model
    has clusters) and the index of each element's value, entropy-coded by zlib in the smaller of two
    layouts (bench/index_coding.py): one byte per index, Huffman-coded (deflate's Huffman-only strategy:
    Deep Compression's stage, within 2% of a Huffman code per tensor at 8 and 16 clusters), or packed to
    the bits the indices need and deflated (smaller at 4 clusters, where a code per index wastes bits).
    A float32 tensor that float16 holds exactly (those of a compressed artifact) is stored as float16."""
    stored, specs = {}, {}
    for name, array in weights.items():
        specs[name] = {"shape": list(array.shape), "dtype": "int8" if array.dtype == np.int8 else "float32"}
        if array.dtype == np.int8:
            values, indices = np.unique(array, return_inverse=True)
            bits = index_bits(len(values))
            huffman = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
            per_byte = huffman.compress(indices.astype(np.uint8).tobytes()) + huffman.flush()
            packed = zlib.compress(pack_bits(torch.from_numpy(indices.reshape(-1)), bits).numpy().tobytes(), 9)
            if len(packed) < len(per_byte):
                specs[name]["bits"] = bits
            stored[f"{name}.indices"] = np.frombuffer(min(per_byte, packed, key=len), dtype=np.uint8)
            stored[f"{name}.values"] = values.astype(np.int8)
        elif array.dtype == np.float32:
            with np.errstate(over="ignore"):  # a value beyond float16's range keeps the tensor float32
                half = array.astype(np.float16)
            stored[name] = half if np.array_equal(half.astype(np.float32), array) else array
        else:
            raise ValueError(f"{name}: no bundle encoding for {array.dtype}")
    return stored, specs
