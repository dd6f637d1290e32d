"""What the cluster indices of an export bundle (or of a compressed artifact) cost under each way of
storing them: packed to the bits their count needs, those packed bits deflated (as compressed artifacts
store them), what the bundle ships (per tensor the smaller of that and one byte per index Huffman-coded
by zlib: core.codec.encode_bundle_weights), a Huffman code per tensor
written by hand (Deep Compression's stage; the size counts each code's table) and the entropy bound of a
per-tensor static code. Prints one line per bundle or artifact.

    python bench/index_coding.py runs/tiny32/export runs/tiny32/compressed/cascade/model.safetensors
"""
import heapq
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runner"))
import runner  # noqa: E402  (numpy and onnxruntime only)
from core.artifacts import load_artifact  # noqa: E402
from core.codec import encode_bundle_weights, index_bits, int8_weights, pack_bits  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length of each symbol of a Huffman code for these counts (0 for an unused symbol)."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    heap = [(int(c), i, [i]) for i, c in enumerate(counts) if c > 0]
    if len(heap) == 1:
        lengths[heap[0][2][0]] = 1
    heapq.heapify(heap)
    order = len(counts)
    while len(heap) > 1:
        (a, _, left), (b, _, right) = heapq.heappop(heap), heapq.heappop(heap)
        lengths[left + right] += 1
        heapq.heappush(heap, (a + b, order, left + right))
        order += 1
    return lengths


def int8_tensors(path: Path) -> dict[str, np.ndarray]:
    """The int8 weights of a bundle folder, or of a compressed artifact."""
    if path.is_dir():
        manifest = runner.read_manifest(path)
        weights = runner.decode_weights(runner.read_safetensors((path / "weights.safetensors").read_bytes()),
                                        manifest["weights"])
        return {name: w for name, w in weights.items() if w.dtype == np.int8}
    artifact = load_artifact(path, decode=False)
    _, weights = int8_weights(artifact.tensors, artifact.extra["compression"], path)
    return {name: weight.numpy() for name, (weight, _) in weights.items()}


def index_costs(path: Path) -> dict:
    stored, _ = encode_bundle_weights(int8_tensors(path))
    costs = {"int8 weights": 0, "packed": 0, "packed + deflate": 0, "shipped": 0, "huffman": 0, "entropy": 0.0}
    for name, weight in int8_tensors(path).items():
        count = weight.size
        values, indices = np.unique(weight, return_inverse=True)
        packed = pack_bits(torch.from_numpy(indices.reshape(-1)), index_bits(len(values))).numpy().tobytes()
        counts = np.bincount(indices.reshape(-1), minlength=len(values))
        probs = counts[counts > 0] / count
        costs["int8 weights"] += count
        costs["packed"] += len(packed)
        costs["packed + deflate"] += len(zlib.compress(packed, 9))
        costs["shipped"] += stored[f"{name}.indices"].nbytes
        costs["huffman"] += int(np.ceil((counts * huffman_lengths(counts)).sum() / 8)) + len(counts)  # + its table
        costs["entropy"] += float(-(probs * np.log2(probs)).sum() * count / 8)
    costs["entropy"] = round(costs["entropy"])
    costs["bits per weight shipped"] = round(8 * costs["shipped"] / max(1, costs["int8 weights"]), 3)
    return costs


@app.command()
def main(paths: list[Path]) -> None:
    for path in paths:
        print(path, json.dumps(index_costs(path)))


if __name__ == "__main__":
    app()
