"""The transformer stage: tokens of two codebook levels computed once, then a base (decoder-only) or
cascade (encoder-decoder) TokenTransformer trained on them with the shared loop."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from core.artifacts import Artifact, file_record, load_artifact, load_module, load_state, save_artifact, state_tensors
from core.autoencoder import load_autoencoder
from core.codebook import SOMCodebook, check_fits, load_codebook
from core.config import config_from_dict, load_config, to_dict
from core.data import Dataset, save_image_grid
from core.errors import PipelineError
from core.fmaps import load_fmap_dataset, load_source_images
from core.sampling import sample_tokens
from core.training import Objective, Trainer, TrainArgs, claim_out_dir, finish_run, setup_run
from core.transformer import TokenShape, TokenTransformer, TransformerConfig, decoder_input, sequence_logits

KIND = "transformer"


def tokenize_all(codebook: SOMCodebook, fmaps: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([codebook.tokenize(chunk) for chunk in fmaps.split(batch_size)])


def condition_counts(labels: torch.Tensor, cond_tokens: torch.Tensor, shape: TokenShape) -> torch.Tensor:
    """How often each condition token occurs with each label (rows 0..L-1) and overall (row L): the base
    level draws its condition token from this at sampling."""
    counts = torch.zeros(shape.num_labels + 1, shape.lr_vocab, dtype=torch.long)
    labelled = labels >= 0
    counts.index_put_((labels[labelled], cond_tokens[labelled]), torch.ones(int(labelled.sum()), dtype=torch.long),
                      accumulate=True)
    counts[shape.num_labels] = torch.bincount(cond_tokens, minlength=shape.lr_vocab)
    return counts


def save_transformer(path: str | Path, model: TokenTransformer, provenance: dict, extra: dict,
                     cond_counts: torch.Tensor | None) -> None:
    tensors = state_tensors(model)
    if cond_counts is not None:
        tensors["cond_counts"] = cond_counts
    config = {"transformer": to_dict(model.cfg), "shape": asdict(model.shape)}
    save_artifact(path, tensors, KIND, config, provenance, extra)


def load_transformer(path: str | Path) -> tuple[TokenTransformer, Artifact]:
    def build(artifact: Artifact) -> TokenTransformer:
        cfg = config_from_dict(TransformerConfig, artifact.config["transformer"], source=str(path))
        return TokenTransformer(cfg, TokenShape(**artifact.config["shape"]))
    return load_module(path, KIND, build)


def null_labels(labels: torch.Tensor, shape: TokenShape) -> torch.Tensor:
    """Dataset labels (-1 = none) as model label ids (the null id for none)."""
    return torch.where(labels >= 0, labels, torch.full_like(labels, shape.null_label))


def drop_labels(labels: torch.Tensor, rate: float, null_label: int) -> torch.Tensor:
    """Replace a `rate` share of labels by the null label, so that the model also learns to generate
    without one (classifier-free guidance needs both)."""
    return torch.where(torch.rand(labels.shape) < rate, torch.full_like(labels, null_label), labels)


@dataclass
class TokenData:
    """A feature-map dataset read as the tokens of two codebook levels."""
    data: Dataset
    lr_book: SOMCodebook
    hr_book: SOMCodebook
    lr_tokens: torch.Tensor  # (N, lr_len)
    hr_tokens: torch.Tensor  # (N, hr_len)
    shape: TokenShape


def load_token_data(dataset_path: Path, lr_codebook_path: Path, hr_codebook_path: Path, base: bool) -> TokenData:
    data, _ = load_fmap_dataset(dataset_path)
    lr_book, _ = load_codebook(lr_codebook_path)
    hr_book, _ = load_codebook(hr_codebook_path)
    check_fits(lr_book.cfg, data.items.shape[1:], lr_codebook_path, dataset_path)
    check_fits(hr_book.cfg, data.items.shape[1:], hr_codebook_path, dataset_path)
    if base and lr_book.cfg.num_patches != 1:
        raise PipelineError(f"--train-base-model needs a condition codebook (patch = the whole map) as "
                            f"--lr-codebook-path; {lr_codebook_path} cuts each map into {lr_book.cfg.num_patches} patches")
    lr_tokens, hr_tokens = tokenize_all(lr_book, data.items), tokenize_all(hr_book, data.items)
    shape = TokenShape("base" if base else "cascade", lr_book.cfg.num_embeddings, hr_book.cfg.num_embeddings,
                       lr_tokens.shape[1], hr_tokens.shape[1], len(data.label_names), data.label_names)
    return TokenData(data, lr_book, hr_book, lr_tokens, hr_tokens, shape)


def adopt_labels(tokens: TokenData, label_names: list[str]) -> TokenData:
    """Re-express the data's labels in another model's label list (for fine-tuning it); a label that
    model does not know becomes no label, so that the model learns it as its unconditional output."""
    shape = replace(tokens.shape, num_labels=len(label_names), label_names=list(label_names))
    return replace(tokens, data=tokens.data.relabelled(label_names), shape=shape)


def split_ids(tokens: TokenData, eval_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training item ids, and a fixed sample of held-out ids (of training ids when nothing is held out)."""
    train_ids = (~tokens.data.is_heldout).nonzero().flatten()
    eval_ids = tokens.data.is_heldout.nonzero().flatten()
    if len(eval_ids) == 0:
        eval_ids = train_ids
    return train_ids, eval_ids[torch.randperm(len(eval_ids), generator=torch.Generator().manual_seed(0))[:eval_items]]


def objective(cfg: TransformerConfig, shape: TokenShape, tokens: TokenData, device: torch.device,
              eval_items: int = 1000) -> Objective:
    """The transformer's batch (random windows of training sequences), loss (next-token cross-entropy)
    and evaluation (held-out loss and accuracy over whole sequences)."""
    train_ids, eval_ids = split_ids(tokens, eval_items)
    labels = null_labels(tokens.data.labels, shape)
    lr_tokens, hr_tokens = tokens.lr_tokens, tokens.hr_tokens
    hr_inputs = decoder_input(hr_tokens, shape.start_token)
    window = cfg.sliding_window if cfg.use_sliding_window else shape.hr_len  # = TokenTransformer.window()

    def get_batch(indices: torch.Tensor) -> dict:
        ids = train_ids[indices]
        batch_labels = drop_labels(labels[ids], cfg.label_dropout, shape.null_label)
        starts = torch.randint(0, shape.hr_len - window + 1, (len(ids), 1))  # all zero when the window fits
        positions = starts + torch.arange(window)
        batch = {"labels": batch_labels, "lr": lr_tokens[ids], "input": hr_inputs[ids].gather(1, positions),
                 "positions": positions, "targets": hr_tokens[ids].gather(1, positions)}
        return {k: v.to(device) for k, v in batch.items()}

    def loss_fn(net, batch: dict, step: int) -> torch.Tensor:
        logits = net(batch["labels"], batch["lr"], batch["input"], batch["positions"])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["targets"].reshape(-1))

    def evaluate(net: TokenTransformer) -> dict:
        total_loss, correct, count = 0.0, 0, 0
        for chunk in eval_ids.split(250):
            targets = hr_tokens[chunk].to(device)
            logits = sequence_logits(net, labels[chunk].to(device), lr_tokens[chunk].to(device), targets)
            total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                          reduction="sum").item()
            correct += (logits.argmax(-1) == targets).sum().item()
            count += targets.numel()
        return {"heldout_loss": total_loss / count, "heldout_accuracy": correct / count}

    return Objective(len(train_ids), get_batch, loss_fn, evaluate, items_per_batch=lambda batch: batch["targets"].numel())


def train(dataset_path: Path, lr_codebook_path: Path, hr_codebook_path: Path, config_path: Path | None,
          args: TrainArgs, device: str, base: bool, decoder_path: Path | None = None,
          init_from: Path | None = None, load_optim: bool = False, use_checkpointing: bool = False, test_num_sample: int = 8,
          temperature: float = 1.0, resume: bool = False, overwrite: bool = False, eval_items: int = 1000) -> Path:
    cfg = load_config(TransformerConfig, config_path)
    tokens = load_token_data(dataset_path, lr_codebook_path, hr_codebook_path, base)
    decoder = load_autoencoder(decoder_path)[0] if decoder_path else None
    start = load_artifact(init_from, (KIND, "checkpoint")) if init_from is not None else None
    if start is not None:  # fine-tuning keeps the labels the model knows
        tokens = adopt_labels(tokens, start.config["shape"]["label_names"])

    env = setup_run(device, args.seed)
    run_config = claim_out_dir(args.out_dir, {"transformer": to_dict(cfg), "shape": asdict(tokens.shape)}, resume,
                               overwrite, env)
    cfg = config_from_dict(TransformerConfig, run_config["transformer"])
    shape = TokenShape(**run_config["shape"])
    model = TokenTransformer(cfg, shape)
    model.use_checkpointing = use_checkpointing
    if start is not None:
        load_state(model, start.tensors, init_from, prefix="model." if start.kind == "checkpoint" else "")
        if load_optim and start.kind != "checkpoint":
            raise PipelineError(f"--load-optim needs --model-path to be a run's checkpoint.safetensors; "
                                f"{init_from} is a {start.kind} artifact, which holds no optimizer state")
    elif load_optim:
        raise PipelineError("--load-optim needs --model-path (a run's checkpoint.safetensors)")
    task = objective(cfg, shape, tokens, env.device, eval_items)
    train_ids, eval_ids = split_ids(tokens, eval_items)
    labels = null_labels(tokens.data.labels, shape)
    lr_book, hr_book, lr_tokens = tokens.lr_book, tokens.hr_book, tokens.lr_tokens
    cond_counts = condition_counts(tokens.data.labels[train_ids], lr_tokens[train_ids, 0], shape) if base else None
    if test_num_sample == 0:
        decoder = None  # no sample grids
    preview_images = load_source_images(tokens.data.take(eval_ids[:test_num_sample])) if decoder is not None else None
    if decoder is not None:
        decoder.to(env.device)
    artifact_path = args.out_dir / "model.safetensors"
    inputs = [file_record(p) for p in (dataset_path, lr_codebook_path, hr_codebook_path, decoder_path, init_from) if p]
    extra = {"lr_codebook": file_record(lr_codebook_path), "hr_codebook": file_record(hr_codebook_path)}
    args.lr, args.warmup_steps, args.weight_decay, args.config = cfg.model_lr, cfg.warmup_steps, cfg.weight_decay, run_config

    def evaluate(net: TokenTransformer, step: int) -> dict:
        record = task.evaluate(net)
        if decoder is not None:
            save_preview(net, step)
        return record

    def save_preview(net: TokenTransformer, step: int) -> None:
        """Rows: real images, their decoded conditioning level, and samples drawn given it."""
        ids = eval_ids[:test_num_sample]
        generator = torch.Generator().manual_seed(args.seed)
        cond = lr_tokens[ids]
        if base:  # draw the condition token as generation does: from the label's recorded distribution
            rows = cond_counts[labels[ids]].float() + 1e-9
            cond = torch.multinomial(rows, 1, generator=generator)
        sampled = sample_tokens(net, labels[ids].to(env.device), cond.to(env.device), temperature=temperature,
                                generator=generator)
        decode = lambda book, tokens: decoder.decoder(book.to(env.device).lookup(tokens.to(env.device))).cpu()
        grid = torch.cat([preview_images.float() / 127.5 - 1, decode(lr_book, cond), decode(hr_book, sampled)])
        save_image_grid(grid, args.out_dir / "samples" / f"samples_{step:07d}.png", columns=len(ids))

    def export(net: TokenTransformer, step: int) -> None:
        save_transformer(artifact_path, net, {"stage": "train_transformer", "inputs": inputs, "step": step},
                         extra, cond_counts)

    Trainer(env, model, task.num_items, task.get_batch, task.loss_fn, args, evaluate, export,
            items_per_batch=task.items_per_batch, optimizer_from=init_from if load_optim else None).fit()
    finish_run(env)
    return artifact_path
