"""The quality report's prompt section: do generated images show what their prompt says?

A small CNN (the report's classifier, with one output per word) learns from the real training images which
informative words their captions name (multi-label: every word of the captions but a few function words).
A generated image agrees with its prompt on a word when the CNN finds the word in it. The floor is the same
share on real held-out images with their own captions: what the measurement itself achieves. A prompt is
*unseen* when no training caption names all of its informative words together (attributes combined in a way
training never showed)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from core.artifacts import file_record, load_artifact, load_state, save_artifact, state_tensors
from core.data import Dataset, load_image_dataset, to_float
from core.models.classifier import FeatureClassifier
from core.models.text import words

KIND = "prompt_classifier"
FILE = "prompt_classifier.safetensors"
FUNCTION_WORDS = {"a", "an", "the", "at", "in", "on", "of", "with", "and", "is", "to", "its", "it"}
MIN_IMAGES = 5  # a word named by fewer training captions is not measured


def informative_words(captions: list[str]) -> list[str]:
    """Words that tell images apart: named by at least MIN_IMAGES captions but not by every one."""
    counts: dict[str, int] = {}
    for caption in captions:
        for word in set(words(caption)):
            counts[word] = counts.get(word, 0) + 1
    return sorted(w for w, n in counts.items() if w not in FUNCTION_WORDS and MIN_IMAGES <= n < len(captions))


def named(captions: list[str | None], vocab: list[str]) -> torch.Tensor:
    """(N, V) bool: whether each caption names each word."""
    return torch.tensor([[w in set(words(c or "")) for w in vocab] for c in captions], dtype=torch.bool).view(-1, len(vocab))


def captioned(data: Dataset) -> Dataset:
    return data.take(torch.tensor([i for i, r in enumerate(data.records) if r.get("caption")], dtype=torch.long))


def train_classifier(train: Dataset, vocab: list[str], config: dict, device: torch.device,
                     progress=iter) -> FeatureClassifier:
    """Binary cross-entropy per word on the captioned training images."""
    targets = named([r["caption"] for r in train.records], vocab).float()
    torch.manual_seed(config["seed"])
    model = FeatureClassifier(train.items.shape[1], len(vocab), config["model_width"], config["features"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(config["seed"])
    model.train()
    for step in progress(range(config["steps"])):
        batch = torch.randint(len(train), (config["batch_size"],), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = config["lr"] * (1 - step / config["steps"])
        loss = F.binary_cross_entropy_with_logits(model(to_float(train.items[batch]).to(device)), targets[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def obtain_classifier(real: Dataset, train: Dataset, vocab: list[str], out_dir: Path, steps: int, seed: int,
                      device: torch.device, progress=iter) -> FeatureClassifier:
    """The word classifier in out_dir if it was made with the same config from the same real data, else a new one."""
    config = {"vocab": vocab, "steps": steps, "seed": seed, "batch_size": 128, "lr": 3e-3, "model_width": 16,
              "features": 128, "shape": list(train.items.shape[1:])}
    source, path = file_record(real.path), out_dir / FILE
    if path.exists():
        artifact = load_artifact(path, KIND)
        if artifact.config == config and artifact.provenance.get("real", {}).get("sha256") == source["sha256"]:
            model = FeatureClassifier(train.items.shape[1], len(vocab), config["model_width"], config["features"])
            load_state(model, artifact.tensors, path)
            return model.to(device).eval()
    model = train_classifier(train, vocab, config, device, progress)
    save_artifact(path, state_tensors(model), KIND, config, {"stage": "evaluate", "real": source, "step": steps})
    return model


@torch.no_grad()
def found(model: FeatureClassifier, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, V) bool: the words the classifier sees in each uint8 image."""
    return torch.cat([model(to_float(chunk).to(device)).cpu() > 0 for chunk in images.split(512)])


def agreement(asked: torch.Tensor, seen: torch.Tensor, vocab: list[str]) -> dict:
    """Per word: the share of the images whose caption names it in which it is found; overall: the share of
    (image, named word) pairs found; all_words: the share of images in which every named word is found."""
    hits = asked & seen
    per_word = {w: float(hits[:, j].sum() / asked[:, j].sum()) for j, w in enumerate(vocab) if asked[:, j].any()}
    return {"images": len(asked), "overall": float(hits.sum() / asked.sum().clamp_min(1)),
            "all_words": float((hits == asked).all(1).float().mean()) if len(asked) else 0.0,
            "per_word": per_word, "named": {w: int(asked[:, j].sum()) for j, w in enumerate(vocab)}}


def unseen_prompts(captions: list[str], train_named: torch.Tensor, vocab: list[str]) -> torch.Tensor:
    """(N,) bool: whether no training caption names all of a caption's informative words."""
    asked = named(captions, vocab).float()
    together = (asked @ train_named.float().T) >= asked.sum(1, keepdim=True)  # (N, T): a training caption names them all
    return ~together.any(1)


def section(real: Dataset, generated_path: Path, out_dir: Path, device: torch.device, seed: int = 0,
            steps: int = 600, progress=iter) -> dict | None:
    """The prompt section of report.json, or None when the real or the generated images have no captions."""
    generated = captioned(load_image_dataset(generated_path))
    real_train, real_heldout = captioned(real.split(heldout=False)), captioned(real.split(heldout=True))
    if len(generated) == 0 or len(real_train) == 0:
        return None
    vocab = informative_words([r["caption"] for r in real_train.records])
    if not vocab:
        return None
    model = obtain_classifier(real, real_train, vocab, out_dir, steps, seed, device, progress)
    result = {"words": vocab, "classifier_steps": steps}
    if len(real_heldout):
        result["real_heldout"] = agreement(named([r["caption"] for r in real_heldout.records], vocab),
                                           found(model, real_heldout.items, device), vocab)
    captions = [r["caption"] for r in generated.records]
    asked, seen = named(captions, vocab), found(model, generated.items, device)
    unseen = unseen_prompts(captions, named([r["caption"] for r in real_train.records], vocab), vocab)
    result["generated"] = agreement(asked, seen, vocab)
    for name, rows in (("generated_seen", ~unseen), ("generated_unseen", unseen)):
        if rows.any():
            result[name] = {**agreement(asked[rows], seen[rows], vocab),
                            "prompts": len({c for c, u in zip(captions, rows.tolist()) if u})}
    return result


def markdown(prompts: dict | None) -> list[str]:
    """report.md's lines for the section (none without it)."""
    if not prompts:
        return []
    columns = [(name, title) for name, title in (("real_heldout", "real held-out (floor)"),
                                                 ("generated_seen", "generated, seen prompts"),
                                                 ("generated_unseen", "generated, unseen prompts")) if name in prompts]
    lines = ["## Prompt agreement", "",
             f"A small CNN trained for {prompts['classifier_steps']} steps on the real training images says which "
             f"of the captions' {len(prompts['words'])} informative words each image shows. Share of the words "
             "named by an image's caption (its prompt) that the CNN finds in it; the real held-out images with their "
             "own captions are the floor. Unseen prompts combine words that no training caption names together.", "",
             "| word | " + " | ".join(title for _, title in columns) + " |", "|---|" + "---:|" * len(columns)]
    cell = lambda name, word: (f"{prompts[name]['per_word'][word]:.1%} ({prompts[name]['named'][word]})"
                               if word in prompts[name]["per_word"] else "-")
    lines += [f"| {word} | " + " | ".join(cell(name, word) for name, _ in columns) + " |" for word in prompts["words"]]
    lines += ["| **all named words (pairs)** | " + " | ".join(f"**{prompts[n]['overall']:.1%}**" for n, _ in columns) + " |",
              "| every word of the caption (images) | " + " | ".join(f"{prompts[n]['all_words']:.1%}" for n, _ in columns)
              + " |", ""]
    counts = ", ".join(f"{title}: {prompts[n]['images']} images" + (f" of {prompts[n]['prompts']} prompts"
                                                                     if "prompts" in prompts[n] else "")
                       for n, title in columns)
    return lines + [f"In parentheses: images whose caption names the word. {counts}.", ""]
