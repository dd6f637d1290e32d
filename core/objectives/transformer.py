"""The transformer's training data and objective: the tokens of two codebook levels computed once, labels
and captions as condition ids (with the dropout that classifier-free guidance needs), and the batch, loss
and held-out evaluation that the transformer stage trains and the compression stage fine-tunes with."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from core.data import Dataset, load_fmap_dataset
from core.errors import PipelineError
from core.model_artifacts import check_fits, load_codebook
from core.models.codebook import SOMCodebook
from core.models.text import Tokenizer
from core.models.transformer import (TokenShape, TokenTransformer, TransformerConfig, decoder_input, sequence_logits,
                                     sequence_window)
from core.training import Objective


def tokenize_all(codebook: SOMCodebook, fmaps: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([codebook.tokenize(chunk) for chunk in fmaps.split(batch_size)])


def condition_counts(labels: torch.Tensor, cond_tokens: torch.Tensor, shape: TokenShape) -> torch.Tensor:
    """How often each condition token occurs with each label (rows 0..L-1) and overall (row L): the base
    level draws its condition token from this at sampling."""
    counts = torch.zeros(shape.num_labels + 1, shape.coarse_vocab, dtype=torch.long)
    labelled = labels >= 0
    counts.index_put_((labels[labelled], cond_tokens[labelled]), torch.ones(int(labelled.sum()), dtype=torch.long),
                      accumulate=True)
    counts[shape.num_labels] = torch.bincount(cond_tokens, minlength=shape.coarse_vocab)
    return counts


def null_labels(labels: torch.Tensor, shape: TokenShape) -> torch.Tensor:
    """Dataset labels (-1 = none) as model label ids (the null id for none)."""
    return torch.where(labels >= 0, labels, torch.full_like(labels, shape.null_label))


def drop_labels(labels: torch.Tensor, rate: float, null_label: int) -> torch.Tensor:
    """Replace a `rate` share of labels by the null label, so that the model also learns to generate
    without one (classifier-free guidance needs both)."""
    return torch.where(torch.rand(labels.shape) < rate, torch.full_like(labels, null_label), labels)


def drop_conditions(labels: torch.Tensor, text: torch.Tensor, cfg: TransformerConfig, null_label: int,
                    null_text: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance's dropout for a model with captions: a `caption_dropout` share of items lose
    both caption and label (the unconditional model that guidance pushes away from); of the others, a
    `label_dropout` share lose the label and, independently, a `caption_dropout` share the caption, so
    that a prompt alone and a label alone are conditions the model knows too."""
    both = torch.rand(labels.shape) < cfg.caption_dropout
    no_label = both | (torch.rand(labels.shape) < cfg.label_dropout)
    no_caption = both | (torch.rand(labels.shape) < cfg.caption_dropout)
    labels = torch.where(no_label, torch.full_like(labels, null_label), labels)
    text = torch.where(no_caption[:, None], torch.tensor(null_text, dtype=text.dtype), text)
    return labels, text


@dataclass
class TokenData:
    """A feature-map dataset read as the tokens of two codebook levels."""
    data: Dataset
    coarse_book: SOMCodebook
    fine_book: SOMCodebook
    coarse_tokens: torch.Tensor  # (N, coarse_len)
    fine_tokens: torch.Tensor  # (N, fine_len)
    shape: TokenShape

    @property
    def captions(self) -> list[str | None]:
        return [record.get("caption") for record in self.data.records]

    @property
    def augmented(self) -> torch.Tensor:
        """(N,) 1 for an augmented copy of a training image, 0 for an image as it is."""
        return torch.tensor([int(bool(record.get("augmented"))) for record in self.data.records], dtype=torch.long)

    def caption_ids(self, shape: TokenShape) -> torch.Tensor | None:
        """(N, text_len) ids of every item's caption for a model with captions (a word its tokenizer does not
        know is left out: fine-tuning data may have new words), else None."""
        tokenizer = shape.tokenizer
        return tokenizer.encode_all(self.captions, lenient=True) if tokenizer is not None else None


def load_token_data(dataset_path: Path, lr_codebook_path: Path, hr_codebook_path: Path, base: bool) -> TokenData:
    data, _ = load_fmap_dataset(dataset_path)
    coarse_book, _ = load_codebook(lr_codebook_path)
    fine_book, _ = load_codebook(hr_codebook_path)
    check_fits(coarse_book.cfg, data.items.shape[1:], lr_codebook_path, dataset_path)
    check_fits(fine_book.cfg, data.items.shape[1:], hr_codebook_path, dataset_path)
    if base and coarse_book.cfg.num_patches != 1:
        raise PipelineError(f"--train-base-model needs a condition codebook (patch = the whole map) as "
                            f"--lr-codebook-path; {lr_codebook_path} cuts each map into {coarse_book.cfg.num_patches} patches")
    coarse_tokens, fine_tokens = tokenize_all(coarse_book, data.items), tokenize_all(fine_book, data.items)
    shape = TokenShape("base" if base else "cascade", coarse_book.cfg.num_embeddings, fine_book.cfg.num_embeddings,
                       coarse_tokens.shape[1], fine_tokens.shape[1], len(data.label_names), data.label_names)
    return TokenData(data, coarse_book, fine_book, coarse_tokens, fine_tokens, shape)


def with_captions(tokens: TokenData, cfg: TransformerConfig) -> TokenData:
    """The data's shape with a tokenizer built from its training captions, when it has captions and the config
    wants a text encoder; unchanged otherwise (the model then is the one without captions)."""
    every_caption = tokens.captions  # built afresh on each access: once, not once per item
    captions = [every_caption[i] for i in (~tokens.data.is_heldout).nonzero().flatten().tolist()]
    if cfg.text_encoder == "none" or not any(captions):
        return tokens
    tokenizer = Tokenizer.build(captions, cfg.max_caption_words)
    return replace(tokens, shape=replace(tokens.shape, text=tokenizer.to_record()))


def adopt_text(tokens: TokenData, text: dict | None) -> TokenData:
    """Fine-tuning keeps the model's tokenizer (or its having none)."""
    return replace(tokens, shape=replace(tokens.shape, text=text))


def adopt_labels(tokens: TokenData, label_names: list[str]) -> TokenData:
    """Re-express the data's labels in another model's label list (for fine-tuning it), that list grown by
    the data's labels it lacks: the tuned model learns each new label as a label of its own and keeps the
    ones it knew."""
    grown = list(label_names) + [name for name in tokens.data.label_names if name not in label_names]
    shape = replace(tokens.shape, num_labels=len(grown), label_names=grown)
    return replace(tokens, data=tokens.data.relabelled(grown), shape=shape)


def grow_label_rows(tensors: dict[str, torch.Tensor], key: str, num_labels: int) -> dict[str, torch.Tensor]:
    """The tensors with the label embedding under `key` grown to `num_labels` labels (plus the null label,
    last): each new label starts from the null label's row, the unconditional model it is tuned from."""
    table = tensors[key]
    known = table.shape[0] - 1
    if known >= num_labels:
        return tensors
    null = table[known:]
    return {**tensors, key: torch.cat([table[:known], null.expand(num_labels - known, -1), null])}


def adapt_augment_rows(tensors: dict[str, torch.Tensor], prefix: str, has_condition: bool,
                       dim: int) -> dict[str, torch.Tensor]:
    """The tensors of a model tuned from, fitted to a model with (or without) the augmentation condition: a
    condition the start lacks begins at zero, and one it had but the tuned model lacks is folded into the label
    rows as sampling uses it (an original), so that either way the tuned model starts as the start model."""
    key, labels = prefix + "augment_emb.weight", prefix + "label_emb.weight"
    if has_condition and key not in tensors:
        return {**tensors, key: torch.zeros(2, dim)}
    if not has_condition and key in tensors:
        rest = {k: v for k, v in tensors.items() if k != key}
        return {**rest, labels: tensors[labels] + tensors[key][0]}
    return tensors


def merged_counts(counts: torch.Tensor, start_counts: torch.Tensor | None) -> torch.Tensor:
    """A tuned base model's condition counts: for a label without training images in this run, those of the
    model it was tuned from, so that asking for a label it knew still draws that label's condition tokens."""
    if start_counts is None:
        return counts
    merged = counts.clone()
    known = start_counts.shape[0] - 1
    unseen = merged[:known].sum(1) == 0
    merged[:known][unseen] = start_counts[:known][unseen]
    return merged


def objective(cfg: TransformerConfig, shape: TokenShape, tokens: TokenData, device: torch.device,
              eval_items: int = 1000) -> Objective:
    """The transformer's batch (random windows of training sequences), loss (next-token cross-entropy)
    and evaluation (held-out loss and accuracy over whole sequences)."""
    train_ids, eval_ids = (~tokens.data.is_heldout).nonzero().flatten(), tokens.data.eval_ids(eval_items)
    labels = null_labels(tokens.data.labels, shape)
    coarse_tokens, fine_tokens = tokens.coarse_tokens, tokens.fine_tokens
    fine_inputs = decoder_input(fine_tokens, shape.start_token)
    window = sequence_window(cfg, shape.fine_len)
    text = tokens.caption_ids(shape)  # None: a model without captions
    predicts_condition = text is not None and shape.kind == "base"
    augmented = tokens.augmented if cfg.augment_condition else None

    def get_batch(indices: torch.Tensor) -> dict:
        ids = train_ids[indices]
        if text is None:
            batch_labels = drop_labels(labels[ids], cfg.label_dropout, shape.null_label)
        else:
            batch_labels, batch_text = drop_conditions(labels[ids], text[ids], cfg, shape.null_label,
                                                       shape.tokenizer.null())
        starts = torch.randint(0, shape.fine_len - window + 1, (len(ids), 1))  # all zero when the window fits
        positions = starts + torch.arange(window)
        batch = {"labels": batch_labels, "coarse": coarse_tokens[ids], "input": fine_inputs[ids].gather(1, positions),
                 "positions": positions, "targets": fine_tokens[ids].gather(1, positions)}
        if text is not None:
            batch["text"] = batch_text
        if augmented is not None:
            batch["augmented"] = augmented[ids]
        return {k: v.to(device) for k, v in batch.items()}

    def loss_fn(net, batch: dict, step: int) -> torch.Tensor:
        smoothing = cfg.label_smoothing
        if not predicts_condition:
            logits = net(batch["labels"], batch["coarse"], batch["input"], batch["positions"], text=batch.get("text"),
                         augmented=batch.get("augmented"))
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["targets"].reshape(-1),
                                   label_smoothing=smoothing)
        # the condition token is one more token of the sequence, predicted before the others
        logits, condition = net(batch["labels"], batch["coarse"], batch["input"], batch["positions"],
                                text=batch["text"], with_condition=True, augmented=batch.get("augmented"))
        total = (F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["targets"].reshape(-1),
                                 reduction="sum", label_smoothing=smoothing)
                 + F.cross_entropy(condition.float(), batch["coarse"][:, 0], reduction="sum",
                                   label_smoothing=smoothing))
        return total / (batch["targets"].numel() + len(condition))

    def evaluate(net: TokenTransformer) -> dict:
        total_loss, correct, count = 0.0, 0, 0
        condition_loss, condition_correct = 0.0, 0
        for chunk in eval_ids.split(250):
            targets = fine_tokens[chunk].to(device)
            chunk_labels, chunk_coarse = labels[chunk].to(device), coarse_tokens[chunk].to(device)
            chunk_text = text[chunk].to(device) if text is not None else None
            logits = sequence_logits(net, chunk_labels, chunk_coarse, targets, chunk_text)
            total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                          reduction="sum").item()
            correct += (logits.argmax(-1) == targets).sum().item()
            count += targets.numel()
            if predicts_condition:
                condition = net.condition_logits(chunk_labels, chunk_text).float()
                condition_loss += F.cross_entropy(condition, chunk_coarse[:, 0], reduction="sum").item()
                condition_correct += (condition.argmax(-1) == chunk_coarse[:, 0]).sum().item()
        if not predicts_condition:
            return {"heldout_loss": total_loss / count, "heldout_accuracy": correct / count}
        # the loss training minimises: the condition token as one more token of each sequence
        return {"heldout_loss": (total_loss + condition_loss) / (count + len(eval_ids)),
                "heldout_accuracy": correct / count, "heldout_token_loss": total_loss / count,
                "heldout_condition_loss": condition_loss / len(eval_ids),
                "heldout_condition_accuracy": condition_correct / len(eval_ids)}

    return Objective(len(train_ids), get_batch, loss_fn, evaluate, items_per_batch=lambda batch: batch["targets"].numel(),
                     metric="heldout_loss", heldout=bool(tokens.data.is_heldout.any()))
