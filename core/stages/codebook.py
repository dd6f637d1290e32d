"""The codebook stage: train a self-organizing map over the patches of a feature-map dataset."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.artifacts import file_record, load_state, state_tensors
from core.config import config_from_dict, load_config, to_dict
from core.data import Dataset, load_fmap_dataset, load_source_images, to_float
from core.errors import PipelineError
from core.model_artifacts import check_fits, load_autoencoder, load_codebook, save_codebook
from core.models.autoencoder import psnr
from core.models.codebook import CodebookConfig, SOMCodebook, quantize, usage_counts, usage_stats
from core.pictures import save_image_grid
from core.training import Objective, Trainer, TrainOptions, claim_out_dir, finish_run, setup_run


@dataclass
class CodebookArgs:
    dataset_path: Path
    options: TrainOptions
    config_path: Path | None = None
    decoder_path: Path | None = None  # for decoded previews and PSNR
    init_from: Path | None = None
    eval_items: int = 1000


def resolve_shape(cfg: CodebookConfig, fmap_shape: tuple[int, int, int], config_source, dataset_path: Path
                  ) -> CodebookConfig:
    """The config with the feature map's shape taken from the data; sizes the config gives must agree."""
    wrong = cfg.mismatch(fmap_shape)
    if wrong:
        raise PipelineError(f"{config_source}: {wrong}, but {dataset_path} holds feature maps of shape "
                            f"{fmap_shape} (C, H, W); leave image_C/H/W out to take them from the data")
    resolved = cfg.resolved(fmap_shape)
    problem = resolved.check()
    if problem:
        raise PipelineError(f"{config_source}: {problem}")
    return resolved


def objective(data: Dataset, device: torch.device, eval_items: int = 1000) -> Objective:
    """The codebook's batch (training feature maps), loss (the SOM's neighbourhood-weighted distance) and
    evaluation (quantization error and unit usage on held-out maps)."""
    train_set = data.split(heldout=False)
    eval_set = data.take(data.eval_ids(eval_items))

    def evaluate(net: SOMCodebook) -> dict:
        quantized = quantize(net, eval_set.items)
        return {"quant_mse": (quantized - eval_set.items).pow(2).mean().item(),
                **usage_stats(usage_counts(net, eval_set.items))}

    return Objective(len(train_set), lambda ids: train_set.items[ids].to(device),
                     lambda net, fmaps, step: net(fmaps, step), evaluate, metric="quant_mse",
                     heldout=bool(data.is_heldout.any()))


def run(args: CodebookArgs) -> Path:
    """Train a SOM codebook on the training split of a feature-map dataset; returns the artifact's path."""
    options = args.options
    data, _ = load_fmap_dataset(args.dataset_path)
    cfg = resolve_shape(load_config(CodebookConfig, args.config_path), tuple(data.items.shape[1:]),
                        args.config_path or "the default codebook config", args.dataset_path)
    decoder = load_autoencoder(args.decoder_path)[0] if args.decoder_path else None
    env = setup_run(options.device, options.seed)
    cfg = config_from_dict(CodebookConfig, claim_out_dir(options.out_dir, to_dict(cfg), options.resume,
                                                         options.overwrite, env))
    codebook = SOMCodebook(cfg)
    if args.init_from is not None:
        start, _ = load_codebook(args.init_from)
        check_fits(start.cfg, data.items.shape[1:], args.init_from, args.dataset_path)
        load_state(codebook, state_tensors(start), args.init_from)
    else:
        codebook.init_from_data(data.split(heldout=False).items)
    task = objective(data, env.device, args.eval_items)
    eval_set = data.take(data.eval_ids(args.eval_items))
    images = to_float(load_source_images(eval_set)) if decoder is not None else None
    if decoder is not None:
        decoder.to(env.device)
    artifact_path = options.out_dir / "codebook.safetensors"
    inputs = [file_record(p) for p in (args.dataset_path, args.decoder_path, args.init_from) if p is not None]

    def preview(net: SOMCodebook, step: int) -> dict:
        """The radius, and with a decoder the PSNR of decoded quantized maps and a grid (rows: originals,
        autoencoder reconstructions, decoded quantized maps)."""
        record = {"radius": net.radius(step)}
        if decoder is not None:
            quantized = quantize(net, eval_set.items)
            decoded = torch.cat([decoder.decoder(q.to(env.device)).cpu() for q in quantized.split(250)])
            plain = torch.cat([decoder.decoder(f.to(env.device)).cpu() for f in eval_set.items[:16].split(250)])
            record["decoded_psnr"] = psnr(decoded, images)
            save_image_grid(torch.cat([images[:16], plain, decoded[:16]]),
                            options.out_dir / "samples" / f"quantized_{step:07d}.png")
        return record

    def export(net: SOMCodebook, step: int) -> None:
        save_codebook(artifact_path, net, {"stage": "train_codebook", "inputs": inputs, "step": step})

    # the nearest-unit search needs full precision: no autocast
    train_args = options.for_stage(stage="train_codebook", lr=cfg.model_lr, warmup_steps=cfg.warmup_steps,
                                   config=to_dict(cfg), mixed_precision=False)
    Trainer(env, codebook, task, train_args, export=export, preview=preview).fit()
    finish_run(env)
    return artifact_path
