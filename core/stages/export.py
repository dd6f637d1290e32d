"""The export stage: the whole generator of a generation config (every level's transformer, the last
level's codebook, the autoencoder's decoder; compressed or not) as one self-contained bundle for an
on-device runtime, onnxruntime, that runs without PyTorch.

The bundle is a folder: bundle.json (the manifest: shapes, sampling settings, provenance, the sha256 of
every part), weights.safetensors (every weight; int8 ones as entropy-coded cluster indices, see
core.codec.encode_bundle_weights), one ONNX graph per transformer step, cascade encoder and decoder
(core.onnx_graphs), and runner.py, which generates images from it with numpy and onnxruntime only."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import save as safetensors_bytes

from core.artifacts import atomic_write_bytes
from core.codec import encode_bundle_weights
from core.config import to_dict
from core.data import source_content_size
from core.errors import PipelineError
from core.models.quantized import Int8Embedding
from core.models.sampling import DecodeSettings
from core.models.transformer import TokenTransformer
from core.onnx_graphs import OPSET, image_decoder, transformer_encoder, transformer_step
from core.generator import Generator, Level

FORMAT = 1
RUNNER = Path(__file__).resolve().parent.parent.parent / "runner" / "runner.py"
EMBEDDINGS = ("label_emb", "cond_emb", "cond_pos", "tok_emb", "pos_emb")
SETTINGS = [name for name in DecodeSettings.__dataclass_fields__] + ["label"]


@dataclass
class ExportArgs:
    config_path: Path  # the generation config: one entry per cascade level
    decoder_path: Path  # the autoencoder
    out_dir: Path  # the bundle folder
    overrides: tuple[str, ...] = ()  # LEVEL.KEY=VALUE settings changed from the config's (--set)
    overwrite: bool = False
    full_size: bool = False  # images keep the padding that the dataset build added (as generate_images.py)


def embedding_weights(model: TokenTransformer, prefix: str) -> dict[str, np.ndarray]:
    """The embedding tables, which the runner looks up itself: float32, or int8 with their scales."""
    tables = {}
    for name in EMBEDDINGS:
        module = getattr(model, name)
        if name == "label_emb" and model.augment_emb is not None:  # sampling's "original" condition, folded in
            labels = torch.arange(module.num_embeddings)
            tables[f"{prefix}{name}.weight"] = model.label_embeddings(labels).detach().float().cpu().numpy()
            continue
        tables[f"{prefix}{name}.weight"] = module.weight.detach().cpu().numpy()
        if isinstance(module, Int8Embedding):
            tables[f"{prefix}{name}.weight_scale"] = module.weight_scale.cpu().numpy()
    return tables


def export_level(index: int, level: Level) -> tuple[dict, dict[str, np.ndarray], dict[str, onnx.ModelProto]]:
    """One level's manifest entry, its weights and its graphs."""
    model, shape, prefix = level.model, level.model.shape, f"level{index}/"
    graphs, weights = {}, embedding_weights(model, prefix)
    roles = {"step": transformer_step}
    if shape.kind == "cascade":
        roles["encoder"] = transformer_encoder
    entry_graphs = {}
    for role, build in roles.items():
        proto, graph_weights = build(model, prefix)
        name = f"level{index}.{role}.onnx"
        graphs[name] = proto
        weights.update(graph_weights)
        entry_graphs[role] = {"file": name, "weights": sorted(graph_weights)}
    cfg = model.cfg
    info = {"prefix": prefix, "kind": shape.kind, "layers": cfg.num_dec_layers, "heads": cfg.self_attn_heads,
            "head_dim": cfg.in_dim // cfg.self_attn_heads, "fine_len": shape.fine_len, "coarse_len": shape.coarse_len,
            "fine_vocab": shape.fine_vocab, "start_token": shape.start_token, "null_label": shape.null_label,
            "num_labels": shape.num_labels, "label_names": list(shape.label_names), "window": model.window(),
            "settings": {key: to_dict(level.settings)[key] for key in SETTINGS}, "graphs": entry_graphs}
    if level.drawn_labels is not None:
        info["drawn_labels"] = list(level.drawn_labels)
    return info, weights, graphs


def run(args: ExportArgs) -> Path:
    """Write the bundle into out_dir and return its manifest's path."""
    generator = Generator.load(args.config_path, args.decoder_path, overrides=args.overrides)
    levels, decoder = generator.levels, generator.decoder
    final = levels[-1].fine_book
    manifest_path = args.out_dir / "bundle.json"
    if args.out_dir.exists() and any(args.out_dir.iterdir()) and not (args.overwrite and manifest_path.exists()):
        raise PipelineError(f"{args.out_dir} is not empty" + ("; use --overwrite to replace the bundle there"
                                                              if manifest_path.exists() else " and holds no bundle"))
    old_parts = set(json.loads(manifest_path.read_text()).get("parts", {})) if manifest_path.exists() else set()

    entries, weights, graphs = [], {}, {}
    for index, level in enumerate(levels):
        entry, level_weights, level_graphs = export_level(index, level)
        entries.append(entry)
        weights.update(level_weights)
        graphs.update(level_graphs)
    weights["level0/cond_counts"] = levels[0].cond_counts.float().numpy()
    weights["codebook/units"] = final.units.detach().float().numpy()
    decoder_graph, decoder_weights = image_decoder(decoder.decoder, "decoder/")
    graphs["decoder.onnx"] = decoder_graph
    weights.update(decoder_weights)

    stored, specs = encode_bundle_weights(weights)
    parts = {"weights.safetensors": safetensors_bytes(stored)}
    parts.update({name: proto.SerializeToString() for name, proto in graphs.items()})
    for name, data in parts.items():
        atomic_write_bytes(args.out_dir / name, data)
    atomic_write_bytes(args.out_dir / "runner.py", RUNNER.read_bytes())
    book = final.cfg
    manifest = {
        "format": FORMAT, "opset": OPSET,
        "parts": {name: hashlib.sha256(data).hexdigest() for name, data in parts.items()},
        "levels": entries,
        "decoder": {"graph": {"file": "decoder.onnx", "weights": sorted(decoder_weights)},
                    "fmap_shape": list(book.fmap_shape), "patch": [book.patch_H, book.patch_W],
                    "crop": None if args.full_size else source_content_size(generator.decoder_artifact.extra)},
        "weights": specs,
        "provenance": generator.provenance(),
    }
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))  # compact: the manifest ships too
    atomic_write_bytes(manifest_path, text.encode())  # last: a bundle stopped midway fails its sha256 checks
    for name in old_parts - set(parts):
        (args.out_dir / name).unlink(missing_ok=True)
    return manifest_path


def bundle_size(out_dir: Path) -> dict[str, int]:
    """Bytes of each file of a bundle, and their total."""
    sizes = {path.name: path.stat().st_size for path in sorted(Path(out_dir).iterdir()) if path.is_file()}
    return {**sizes, "total": sum(sizes.values())}
