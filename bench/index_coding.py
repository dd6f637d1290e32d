"""What the cluster indices of an export bundle cost under each way of storing them: packed to the bits
their count needs, deflated (what the bundle ships), Huffman-coded with one code per tensor (Deep
Compression's choice; the size counts each code's table), and the entropy bound of a per-tensor static
code. Prints one line per bundle; the bundles' int8 tensors are read back with the runner's decoder.

    python bench/index_coding.py runs/tiny/export runs/tiny/export_c8 runs/tiny/export_c4
"""
import heapq
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runner"))
import runner  # noqa: E402  (numpy and onnxruntime only)

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


def index_costs(bundle: Path) -> dict:
    manifest = runner.read_manifest(bundle)
    stored = runner.read_safetensors((bundle / "weights.safetensors").read_bytes())
    costs = {"int8 weights": 0, "packed": 0, "deflate": 0, "huffman": 0, "entropy": 0.0}
    for name, spec in manifest["weights"].items():
        if spec["dtype"] != "int8":
            continue
        count = int(np.prod(spec["shape"]))
        packed = np.frombuffer(zlib.decompress(stored[f"{name}.indices"].tobytes()), dtype=np.uint8)
        indices = runner.unpack_bits(packed, spec["bits"], count)
        counts = np.bincount(indices, minlength=len(stored[f"{name}.values"]))
        probs = counts[counts > 0] / count
        costs["int8 weights"] += count
        costs["packed"] += len(packed)
        costs["deflate"] += stored[f"{name}.indices"].nbytes
        costs["huffman"] += int(np.ceil((counts * huffman_lengths(counts)).sum() / 8)) + len(counts)  # + its table
        costs["entropy"] += float(-(probs * np.log2(probs)).sum() * count / 8)
    costs["entropy"] = round(costs["entropy"])
    costs["bits per weight (deflate)"] = round(8 * costs["deflate"] / max(1, costs["int8 weights"]), 3)
    return costs


@app.command()
def main(bundles: list[Path]) -> None:
    for bundle in bundles:
        print(bundle, json.dumps(index_costs(bundle)))


if __name__ == "__main__":
    app()
