"""The tokenizer ceiling: the floor's real images as stored, through the autoencoder, and through each
codebook (encode, tokenize, look up, decode), each compared with the same reference as the generated set.
A perfect tokenizer scores the real floor (1x); no generator beats the reconstructions of its last codebook."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.artifacts import file_record
from core.data import Dataset, crop_to_content, read_image_files, to_float, to_uint8
from core.errors import PipelineError
from core.metrics import all_metrics
from core.model_artifacts import check_fits, load_autoencoder, load_codebook
from core.models.autoencoder import Autoencoder
from core.models.codebook import SOMCodebook
from core.report.sets import EvalArgs
from core.report.spaces import Featurize, Spaces


@dataclass
class Tokenizer:
    autoencoder: Autoencoder
    codebooks: list[tuple[str, SOMCodebook]]  # (a name for the report, the codebook)
    decoder: Autoencoder | None = None  # the decoder generation uses, fine-tuned on the last codebook's maps


def tokenizer_for(args: EvalArgs, real: Dataset, device: torch.device) -> Tokenizer | None:
    """The report's tokenizer (None without --autoencoder-path), checked against the images as stored."""
    if args.codebook_paths and args.autoencoder_path is None:
        raise PipelineError("--ceiling-codebook needs --autoencoder-path (the autoencoder whose maps it tokenizes)")
    if args.decoder_path is not None and not args.codebook_paths:
        raise PipelineError("--ceiling-decoder needs --ceiling-codebook (the codebook whose maps it decodes)")
    if args.autoencoder_path is None:
        return None
    stored_shape = (real.items.shape[1], *[real.info.get("size", side) for side in real.items.shape[-2:]])
    tokenizer = load_tokenizer(args.autoencoder_path, args.codebook_paths, stored_shape, device)
    if args.decoder_path is not None:
        decoder, _ = load_autoencoder(args.decoder_path)
        side = stored_shape[-1]
        if decoder.latent_shape(side) != tokenizer.autoencoder.latent_shape(side):
            raise PipelineError(f"{args.decoder_path} decodes maps of shape {decoder.latent_shape(side)}, "
                                f"{args.autoencoder_path} makes {tokenizer.autoencoder.latent_shape(side)}")
        tokenizer.decoder = decoder.to(device)
    return tokenizer


def load_tokenizer(autoencoder_path: Path, codebook_paths: list[Path], image_shape: tuple[int, ...],
                   device: torch.device) -> Tokenizer:
    """The autoencoder and codebooks, checked against the real images' shape (C, H, W) and each other."""
    autoencoder, _ = load_autoencoder(autoencoder_path)
    if image_shape[0] != autoencoder.cfg.image_channel:
        raise PipelineError(f"{autoencoder_path} expects {autoencoder.cfg.image_channel}-channel images, "
                            f"the real data has {image_shape[0]}-channel images")
    latent = autoencoder.latent_shape(image_shape[-1])
    codebooks = []
    for path in codebook_paths:
        codebook, _ = load_codebook(path)
        check_fits(codebook.cfg, latent, path, autoencoder_path)
        cfg = codebook.cfg
        tokens = f"{cfg.num_patches} token{'s' if cfg.num_patches > 1 else ''}"
        shape = f"{cfg.patch_H}x{cfg.patch_W} patches: {tokens}, {cfg.num_embeddings} units"
        codebooks.append((f"codebook `{path.parent.name}` ({shape})", codebook.to(device)))
    return Tokenizer(autoencoder.to(device), codebooks)


@torch.no_grad()
def reconstructions(images: torch.Tensor, tokenizer: Tokenizer, device: torch.device,
                    batch_size: int = 256) -> list[tuple[str, torch.Tensor]]:
    """uint8 images passed through the autoencoder, and through each codebook (encode, tokenize, look the
    tokens up, decode), each rounded to uint8 like a stored image: [(name, images)]; with a fine-tuned decoder,
    the last codebook's maps decoded by it too."""
    autoencoder = tokenizer.autoencoder
    fmaps = torch.cat([autoencoder.encoder(to_float(b).to(device)) for b in images.split(batch_size)])

    def decode(maps: torch.Tensor, decoder: Autoencoder = autoencoder) -> torch.Tensor:
        return torch.cat([to_uint8(decoder.decoder(m).float().clamp(-1, 1)) for m in maps.split(batch_size)])

    def quantized(codebook: SOMCodebook) -> torch.Tensor:
        return torch.cat([codebook.lookup(codebook.tokenize(m)) for m in fmaps.split(batch_size)])

    maps = [(name, quantized(cb)) for name, cb in tokenizer.codebooks]
    rows = [("autoencoder", decode(fmaps))] + [(name, decode(m)) for name, m in maps]
    if tokenizer.decoder is not None and maps:
        name, last = maps[-1]
        rows.append((f"{name.split(' (')[0]}, the fine-tuned decoder", decode(last, tokenizer.decoder)))
    return rows


def ceiling_rows(candidates: list[tuple[str, torch.Tensor]], references: dict[str, torch.Tensor],
                 featurizers: dict[str, Featurize], floors: dict[str, float], k: int | None) -> list[dict]:
    """Each candidate image set's metrics against the reference in every space, its Fréchet distance also
    as a multiple of the real floor's."""
    rows = []
    for name, images in candidates:
        row = {"images": name, "spaces": {}}
        for space, featurize in featurizers.items():
            metrics = all_metrics(references[space], featurize(images), k)
            metrics["frechet_over_floor"] = metrics["frechet_distance"] / max(floors[space], 1e-12)
            row["spaces"][space] = metrics
        rows.append(row)
    return rows


def section(args: EvalArgs, tokenizer: Tokenizer | None, floor: Dataset, spaces: Spaces,
            device: torch.device) -> dict:
    """The floor's real images as stored and reconstructed, and the generated set, as rows of figures."""
    if tokenizer is None:
        return {"skipped": "no --autoencoder-path given"}
    measured = spaces.report["spaces"]
    floors = {space: metrics["frechet_distance"]["real_floor"] for space, metrics in measured.items()}
    candidates = [("real images as stored", floor.items)]
    size = floor.info.get("size")
    cut = size is not None and tuple(floor.items.shape[-2:]) != (size, size)
    stored = read_image_files([floor.path.parent / r["image_fpath"] for r in floor.records],
                              floor.items.shape[1]) if cut else floor.items
    # reconstructed as stored (padded, when the build padded them), compared at the floor's own size
    candidates += [(name, crop_to_content(images, [floor.items.shape[-1], floor.items.shape[-2]]).contiguous())
                   for name, images in reconstructions(stored, tokenizer, device)]
    rows = ceiling_rows(candidates, spaces.references, spaces.featurizers, floors, spaces.k)
    rows.append({"images": "generated", "spaces": {
        space: {**{m: v["value"] for m, v in metrics.items()},
                "frechet_over_floor": metrics["frechet_distance"]["value"] / max(floors[space], 1e-12)}
        for space, metrics in measured.items()}})
    return {"autoencoder": file_record(args.autoencoder_path),
            "codebooks": [file_record(p) for p in args.codebook_paths], "images": len(floor), "rows": rows,
            **({"decoder": file_record(args.decoder_path)} if args.decoder_path is not None else {})}


def markdown(ceiling: dict) -> list[str]:
    lines = ["## Tokenizer ceiling", ""]
    if "skipped" in ceiling:
        return lines + [f"Skipped: {ceiling['skipped']} (evaluate.py --autoencoder-path, --ceiling-codebook).", ""]
    lines += [f"The {ceiling['images']} real images of the floor, as stored and passed through the autoencoder "
              f"`{ceiling['autoencoder']['path']}` and each codebook (encode, tokenize, look up, decode), against the "
              "same reference as the generated images. A perfect tokenizer scores the real floor (1.0x); no "
              "generator does better than the reconstructions of its last codebook.", ""]
    for space, first in ceiling["rows"][0]["spaces"].items():
        knn = "precision" in first
        lines += [f"| images | Fréchet distance ({space.replace('_', ' ')}) | x real floor"
                  + (" | precision | recall |" if knn else " |"), "|---|---:|---:|" + ("---:|---:|" if knn else "")]
        lines += [f"| {row['images']} | {m['frechet_distance']:.3g} | {m['frechet_over_floor']:.2f}x |"
                  + (f" {m['precision']:.3g} | {m['recall']:.3g} |" if knn else "")
                  for row in ceiling["rows"] for m in [row["spaces"][space]]]
        lines.append("")
    return lines
