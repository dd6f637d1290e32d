"""Each model's artifact: its tensors and the config that rebuilds it (core.artifacts does the file work,
core.models the modules). A loader checks the artifact's kind and every tensor's shape."""
from __future__ import annotations

from pathlib import Path

import torch

from core.artifacts import Artifact, load_module, read_kind, save_artifact, state_tensors
from core.config import config_from_dict, to_dict
from core.errors import PipelineError
from core.models.autoencoder import Autoencoder, AutoencoderConfig
from core.models.codebook import CodebookConfig, SOMCodebook
from core.models.transformer import TokenShape, TokenTransformer, TransformerConfig, config_record

AUTOENCODER, CODEBOOK, TRANSFORMER = "autoencoder", "codebook", "transformer"


def save_autoencoder(path: str | Path, model: Autoencoder, provenance: dict, extra: dict | None = None) -> None:
    save_artifact(path, state_tensors(model), AUTOENCODER, to_dict(model.cfg), provenance, extra)


def load_autoencoder(path: str | Path, int8: bool = True) -> tuple[Autoencoder, Artifact]:
    """`int8`: a compressed autoencoder keeps its clustered weights in int8 (see load_transformer)."""
    return load_module(path, AUTOENCODER,
                       lambda a: Autoencoder(config_from_dict(AutoencoderConfig, a.config, source=str(path))), int8)


def save_codebook(path: str | Path, codebook: SOMCodebook, provenance: dict, extra: dict | None = None) -> None:
    save_artifact(path, state_tensors(codebook), CODEBOOK, to_dict(codebook.cfg), provenance, extra)


def load_codebook(path: str | Path) -> tuple[SOMCodebook, Artifact]:
    return load_module(path, CODEBOOK,
                       lambda a: SOMCodebook(config_from_dict(CodebookConfig, a.config, source=str(path))))


def save_transformer(path: str | Path, model: TokenTransformer, provenance: dict, extra: dict,
                     cond_counts: torch.Tensor | None) -> None:
    """`cond_counts` (base models): how often each condition token came with each label in training."""
    tensors = state_tensors(model)
    if cond_counts is not None:
        tensors["cond_counts"] = cond_counts
    config = {"transformer": config_record(model.cfg, model.shape), "shape": model.shape.to_record()}
    save_artifact(path, tensors, TRANSFORMER, config, provenance, extra)


def load_transformer(path: str | Path, int8: bool = True) -> tuple[TokenTransformer, Artifact]:
    """`int8`: a compressed model runs with its clustered weights in int8 (a quarter of float32's memory);
    False decodes them to float32, as training from it (--init-from) does. An uncompressed model loads
    as float32 either way."""
    def build(artifact: Artifact) -> TokenTransformer:
        cfg = config_from_dict(TransformerConfig, artifact.config["transformer"], source=str(path))
        return TokenTransformer(cfg, TokenShape.from_record(artifact.config["shape"]))
    return load_module(path, TRANSFORMER, build, int8)


def load_model(path: str | Path, int8: bool = True) -> tuple[torch.nn.Module, Artifact]:
    """An autoencoder or transformer artifact and its model."""
    if read_kind(path, (AUTOENCODER, TRANSFORMER)) == AUTOENCODER:
        return load_autoencoder(path, int8)
    return load_transformer(path, int8)


def check_fits(cfg: CodebookConfig, fmap_shape, codebook_path: str | Path, data_path: str | Path) -> None:
    """A codebook is made for one feature-map shape: refuse data of another."""
    if tuple(cfg.fmap_shape) != tuple(fmap_shape):
        raise PipelineError(f"{codebook_path} is for feature maps of shape {tuple(cfg.fmap_shape)} (C, H, W), "
                            f"but {data_path} holds maps of shape {tuple(fmap_shape)}")
