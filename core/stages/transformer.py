"""The transformer stage (the seed's train_quantized_transformer.py): the tokens of two codebook levels are
computed once, then a base (decoder-only; the coarse level is the whole-map condition codebook) or a
cascade (encoder-decoder) TokenTransformer learns to predict the fine level's tokens. When the data has
captions (and the config's text_encoder is not "none"), the model also learns a text encoder over a
tokenizer built from the training captions, and a base model learns to predict the condition token."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.artifacts import Artifact, file_record, load_artifact, load_state
from core.config import config_from_dict, load_config
from core.console import notice
from core.data import load_source_images
from core.errors import PipelineError
from core.model_artifacts import TRANSFORMER, load_autoencoder, save_transformer
from core.models.autoencoder import Autoencoder
from core.models.sampling import DecodeSettings, condition_tokens, sample_tokens
from core.models.transformer import (AUTO_CONDITIONING_BELOW, TokenShape, TokenTransformer, TransformerConfig,
                                     config_record)
from core.objectives.transformer import (TokenData, adapt_augment_rows, adopt_labels, adopt_text, condition_counts,
                                         grow_label_rows, load_token_data, merged_counts, null_labels, objective,
                                         with_captions)
from core.pictures import save_image_grid
from core.training import Trainer, TrainOptions, claim_out_dir, finish_run, setup_run


@dataclass
class TransformerArgs:
    dataset_path: Path
    lr_codebook_path: Path  # the coarse level's codebook (the seed's "low resolution")
    hr_codebook_path: Path  # the fine level's codebook, whose tokens the model predicts
    options: TrainOptions
    base: bool = False  # the base (decoder-only) model; otherwise a cascade model
    config_path: Path | None = None
    decoder_path: Path | None = None  # for sample grids
    init_from: Path | None = None  # a transformer artifact or a run's checkpoint.safetensors
    load_optim: bool = False  # with init_from a checkpoint: keep its optimizer state too
    use_checkpointing: bool = False  # activation checkpointing
    test_num_sample: int = 8  # images per sample grid (0: none)
    temperature: float = 1.0  # of the sample grids
    eval_items: int = 1000


def tuning_scope(cfg: TransformerConfig, tokens: TokenData) -> dict:
    """Which weights tuning trains (`scope`): the config's tune_scope, or for auto the one that the fewest
    original training images of a tuned label call for."""
    if cfg.tune_scope != "auto":
        return {"scope": cfg.tune_scope}
    originals = tokens.data.labels[~tokens.data.is_heldout & (tokens.augmented == 0)]
    labelled = originals[originals >= 0]
    counts = torch.bincount(labelled) if len(labelled) else torch.tensor([len(originals)])
    fewest = int(counts[counts > 0].min()) if bool((counts > 0).any()) else 0
    return {"scope": "conditioning" if fewest < AUTO_CONDITIONING_BELOW else "upper", "asked": "auto",
            "fewest_images_per_label": fewest}


def build_model(cfg: TransformerConfig, shape: TokenShape, args: TransformerArgs, start,
                scope: str = "all") -> TokenTransformer:
    """The model to train: fresh, or with the weights of the --init-from artifact or checkpoint, tuned in
    `scope` (TUNE_SCOPES)."""
    model = TokenTransformer(cfg, shape)
    model.use_checkpointing = args.use_checkpointing
    if start is not None:
        prefix = "model." if start.kind == "checkpoint" else ""
        tensors = grow_label_rows(start.tensors, prefix + "label_emb.weight", shape.num_labels)
        if args.load_optim and tensors is not start.tensors:
            raise PipelineError(f"--load-optim: the data has labels that {args.init_from} does not know, and its "
                                f"optimizer state has no room for them; tune without --load-optim")
        tensors = adapt_augment_rows(tensors, prefix, cfg.augment_condition, cfg.in_dim)
        load_state(model, tensors, args.init_from, prefix=prefix)
        model.freeze_for_tuning(scope)
        if args.load_optim and start.kind != "checkpoint":
            raise PipelineError(f"--load-optim needs --model-path to be a run's checkpoint.safetensors; "
                                f"{args.init_from} is a {start.kind} artifact, which holds no optimizer state")
    elif args.load_optim:
        raise PipelineError("--load-optim needs --model-path (a run's checkpoint.safetensors)")
    return model


def label_origin(start: Artifact, tokens: TokenData, shape: TokenShape) -> dict:
    """Where a tuned model's labels come from: those the model it was tuned from knew, and those of this run's
    training images (generation draws among these by default)."""
    trained = {int(i) for i in tokens.data.labels[~tokens.data.is_heldout] if i >= 0}
    return {"pretrained": list(start.config["shape"]["label_names"]),
            "tuned": [shape.label_names[i] for i in sorted(trained)]}


def sample_grids(args: TransformerArgs, tokens: TokenData, shape: TokenShape, cond_counts: torch.Tensor | None,
                 decoder: Autoencoder | None, device: torch.device):
    """The preview hook: grids whose rows are real held-out images, their decoded coarse level, and
    samples drawn given it. None without a decoder."""
    if decoder is None:
        return None
    decoder.to(device)
    ids = tokens.data.eval_ids(args.eval_items)[:args.test_num_sample]
    real = load_source_images(tokens.data.take(ids)).float() / 127.5 - 1
    labels = null_labels(tokens.data.labels, shape)[ids]
    text = tokens.caption_ids(shape)
    text = text[ids].to(device) if text is not None else None

    def preview(net: TokenTransformer, step: int) -> None:
        generator = torch.Generator().manual_seed(args.options.seed)
        cond = tokens.coarse_tokens[ids]
        if args.base and text is not None:  # the model's own condition token for the item's caption and label
            cond = condition_tokens(net, labels.to(device), text, DecodeSettings(temperature=args.temperature),
                                    [generator] * len(ids))
        elif args.base:  # draw the condition token as generation does: from the label's recorded distribution
            cond = torch.multinomial(cond_counts[labels].float() + 1e-9, 1, generator=generator)
        sampled = sample_tokens(net, labels.to(device), cond.to(device), temperature=args.temperature,
                                generator=generator, text=text)
        decode = lambda book, codes: decoder.decoder(book.to(device).lookup(codes.to(device))).cpu()
        grid = torch.cat([real, decode(tokens.coarse_book, cond), decode(tokens.fine_book, sampled)])
        save_image_grid(grid, args.options.out_dir / "samples" / f"samples_{step:07d}.png", columns=len(ids))
    return preview


def run(args: TransformerArgs) -> Path:
    """Train a base or cascade transformer; returns the artifact's path."""
    options = args.options
    cfg = load_config(TransformerConfig, args.config_path)
    tokens = load_token_data(args.dataset_path, args.lr_codebook_path, args.hr_codebook_path, args.base)
    start = load_artifact(args.init_from, (TRANSFORMER, "checkpoint")) if args.init_from is not None else None
    if start is not None:  # fine-tuning keeps the labels and the words the model knows
        tokens = adopt_labels(tokens, start.config["shape"]["label_names"])
        tokens = adopt_text(tokens, start.config["shape"].get("text"))
    else:
        tokens = with_captions(tokens, cfg)
    if tokens.shape.text is not None:
        tokenizer = tokens.shape.tokenizer
        notice(f"captions: a text encoder over {len(tokenizer.vocab)} words, {tokenizer.length} per caption")
    # built before the seed is set, so that sample grids do not change the training's random numbers
    decoder = load_autoencoder(args.decoder_path)[0] if args.decoder_path and args.test_num_sample else None

    env = setup_run(options.device, options.seed)
    run_config = claim_out_dir(options.out_dir, {"transformer": config_record(cfg, tokens.shape),
                                                 "shape": tokens.shape.to_record()},
                               options.resume, options.overwrite, env)
    cfg = config_from_dict(TransformerConfig, run_config["transformer"])
    shape = TokenShape.from_record(run_config["shape"])
    tuning = tuning_scope(cfg, tokens) if start is not None else None
    if tuning is not None and "asked" in tuning:
        notice(f"tune_scope auto: {tuning['scope']} ({tuning['fewest_images_per_label']} training images of the "
               f"tuned label with the fewest)")
    model = build_model(cfg, shape, args, start, tuning["scope"] if tuning else "all")
    task = objective(cfg, shape, tokens, env.device, args.eval_items)
    train_ids = (~tokens.data.is_heldout).nonzero().flatten()
    cond_counts = (condition_counts(tokens.data.labels[train_ids], tokens.coarse_tokens[train_ids, 0], shape)
                   if args.base else None)
    if args.base and start is not None:
        cond_counts = merged_counts(cond_counts, start.tensors.get("cond_counts"))
    preview = sample_grids(args, tokens, shape, cond_counts, decoder, env.device)
    artifact_path = options.out_dir / "model.safetensors"
    inputs = [file_record(p) for p in (args.dataset_path, args.lr_codebook_path, args.hr_codebook_path,
                                       args.decoder_path, args.init_from) if p]
    extra = {"lr_codebook": file_record(args.lr_codebook_path), "hr_codebook": file_record(args.hr_codebook_path)}
    if start is not None and shape.num_labels:
        extra["label_origin"] = label_origin(start, tokens, shape)
    if tuning is not None:
        extra["tune_scope"] = tuning

    def export(net: TokenTransformer, step: int) -> None:
        save_transformer(artifact_path, net, {"stage": "train_transformer", "inputs": inputs, "step": step},
                         extra, cond_counts)

    train_args = options.for_stage(stage="train_transformer", lr=cfg.model_lr, warmup_steps=cfg.warmup_steps,
                                   weight_decay=cfg.weight_decay, ema_decay=cfg.ema_decay,
                                   patience_steps=cfg.patience_steps, config=run_config)
    Trainer(env, model, task, train_args, export=export, preview=preview,
            optimizer_from=args.init_from if args.load_optim else None).fit()
    finish_run(env)
    return artifact_path
