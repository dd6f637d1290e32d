"""Captions and prompts: captions from the source into the dataset, the feature maps and a text-conditioned
model; prompts at generation (guidance, unknown words, a file of prompts); a model trained without captions
unchanged; and the report's prompt agreement."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_AE, build_dataset, options, run_script, shape_image, teacher_forced
from core.artifacts import load_artifact
from core.data import load_fmap_dataset, load_image_dataset, read_records, read_table, write_dataset_json
from core.model_artifacts import load_transformer
from core.models.sampling import DecodeSettings, condition_tokens, generate_tokens
from core.models.text import Tokenizer
from core.models.transformer import TokenShape, TokenTransformer, TransformerConfig, decoder_input
from core.report import prompt_agreement
from core.stages import autoencoder, codebook, fmaps, transformer
from core.objectives.transformer import drop_conditions

SHAPES = ["circle", "square", "bar"]
SMALL = dict(in_dim=32, hidden_dim=64, num_dec_layers=2, num_enc_layers=1, self_attn_heads=2, cross_attn_heads=2,
             text_layers=1)


def caption_of(kind: int, i: int) -> str:
    return f"a {'bright' if i % 2 else 'dim'} {SHAPES[kind]}"


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> dict:
    """A folder of shapes with a caption file beside each image, built, encoded and tokenized: the chain up to
    the transformers (16x16 -> (2, 8, 8) maps; whole-map, 4x4 and 2x2 codebooks)."""
    root = tmp_path_factory.mktemp("captioned")
    folder = root / "shapes"
    for kind, name in enumerate(SHAPES):
        (folder / name).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(shape_image(kind, kind * 1000 + i)).save(folder / name / f"{i:03d}.png")
            (folder / name / f"{i:03d}.txt").write_text(caption_of(kind, i) + "\n")
    build_dataset(folder, root / "data", 16, holdout=0.15)
    (root / "ae.json").write_text(json.dumps(TINY_AE))
    ae = autoencoder.run(autoencoder.AutoencoderArgs(
        dataset_path=root / "data" / "dataset.json", config_path=root / "ae.json",
        options=options(root / "ae", batch_size=8, max_epoch=100, max_steps=40)))
    fmaps.run(fmaps.FmapArgs(dataset_path=root / "data" / "dataset.json", model_path=ae, out_dir=root / "fmaps",
                             device="cpu", batch_size=32, shard_size=1000))
    paths = {"root": root, "folder": folder, "data": root / "data" / "dataset.json", "autoencoder": ae,
             "fmaps": root / "fmaps" / "dataset.json"}
    for name, patch, units in (("cond", 8, 8), ("l1", 4, 16), ("l2", 2, 32)):
        config = root / f"cb_{name}.json"
        config.write_text(json.dumps({"patch_H": patch, "patch_W": patch, "num_embeddings": units, "model_lr": 0.01}))
        paths[name] = codebook.run(codebook.CodebookArgs(dataset_path=paths["fmaps"], config_path=config,
                                   options=options(root / f"cb_{name}", batch_size=8, max_epoch=100, max_steps=20)))
    return paths


def train(paths: dict, out_name: str, base: bool = True, steps: int = 30, **config) -> object:
    config_path = paths["root"] / f"{out_name}.json"
    config_path.write_text(json.dumps({**SMALL, "model_lr": 0.003, "warmup_steps": 5, **config}))
    lr, hr = ("cond", "l1") if base else ("l1", "l2")
    return transformer.run(transformer.TransformerArgs(
        dataset_path=paths["fmaps"], lr_codebook_path=paths[lr], hr_codebook_path=paths[hr], config_path=config_path,
        base=base, test_num_sample=0, options=options(paths["root"] / out_name, batch_size=8, max_epoch=100,
                                                         max_steps=steps)))


@pytest.fixture(scope="module")
def text_models(captioned) -> dict:
    """A base and a cascade model trained on the captions, and a generation config naming them."""
    paths = dict(captioned)
    paths["base"], paths["cascade"] = train(captioned, "base"), train(captioned, "cascade", base=False)
    levels = {"0": {"model_path": str(paths["base"]), "lr_codebook_path": str(captioned["cond"]),
                    "hr_codebook_path": str(captioned["l1"])},
              "1": {"model_path": str(paths["cascade"]), "lr_codebook_path": str(captioned["l1"]),
                    "hr_codebook_path": str(captioned["l2"])}}
    paths["levels"] = levels
    return paths


def write_config(path, levels: dict, **level0) -> object:
    path.write_text(json.dumps({**levels, "0": {**levels["0"], **level0}}))
    return path


# ---------------------------------------------------------------- the tokenizer

def test_tokenizer_words_ids_and_problems():
    tokenizer = Tokenizer.build(["A striped short-sleeved dress", "a plain dress", None], most_words=16)
    assert tokenizer.vocab == ["a", "dress", "plain", "short", "sleeved", "striped"] and tokenizer.length == 5
    assert tokenizer.encode("a STRIPED dress") == [2, 7, 3, 0, 0]
    assert tokenizer.encode(None) == tokenizer.encode("") == tokenizer.null() == [1, 0, 0, 0, 0]
    assert Tokenizer.from_record(json.loads(json.dumps(tokenizer.to_record()))) == tokenizer
    problem = tokenizer.problem("a stripped dres")
    assert "unknown words 'stripped' (nearest known: 'striped'" in problem and "'dres' (nearest known: 'dress'" in problem
    assert "reads at most 5" in tokenizer.problem("a plain dress a plain dress")
    assert tokenizer.problem("a plain dress") is None
    assert tokenizer.encode("a new dress", lenient=True) == [2, 3, 0, 0, 0]  # fine-tuning data: new words left out
    with pytest.raises(KeyError):
        tokenizer.encode("a new dress")


# ---------------------------------------------------------------- captions through the chain

def test_captions_from_a_csv_or_json_file(tmp_path, image_folder):
    lines = ["file,caption", "circle/000.png,a round thing", "001.png,never unique"]
    (tmp_path / "captions.csv").write_text("\n".join(lines[:2]) + "\n")
    counts = build_dataset(image_folder, tmp_path / "a", captions=tmp_path / "captions.csv")
    records, _ = read_records(tmp_path / "a" / "dataset.json")
    assert counts["captions"] == 1 and [r["caption"] for r in records if "caption" in r] == ["a round thing"]
    (tmp_path / "captions.json").write_text(json.dumps({"bar/003.png": "  a tall   bar "}))
    build_dataset(image_folder, tmp_path / "b", captions=tmp_path / "captions.json")
    assert [r["caption"] for r in read_records(tmp_path / "b" / "dataset.json")[0] if "caption" in r] == ["a tall bar"]
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")  # 001.png is in every sub-folder: not one image
    result = run_script("build_dataset.py", "--source", image_folder, "--out-dir", tmp_path / "c",
                        "--captions", tmp_path / "bad.csv")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "1 caption(s) name no image of the source, e.g. '001.png'" in result.stderr
    assert not (tmp_path / "c").exists()


def test_captions_round_trip_through_build_fmaps_and_training(text_models):
    records, _ = read_records(text_models["data"])
    assert all(r["caption"].endswith(" " + r["labels"][0]) for r in records)
    assert {r["caption"] for r in records} == {caption_of(k, i) for k in range(3) for i in range(2)}
    data, _ = load_fmap_dataset(text_models["fmaps"])
    assert [r["caption"] for r in data.records] == [r["caption"] for r in records]
    model, artifact = load_transformer(text_models["base"])
    assert model.tokenizer.vocab == ["a", "bar", "bright", "circle", "dim", "square"] and model.tokenizer.length == 3
    assert artifact.config["transformer"]["text_encoder"] == "scratch"
    assert any(name.startswith("text_encoder.") for name in artifact.tensors) and "cond_head.weight" in artifact.tensors
    cascade, _ = load_transformer(text_models["cascade"])
    assert cascade.tokenizer == model.tokenizer and cascade.cond_head is None


def test_a_model_trained_without_captions_is_unchanged(captioned, tmp_path):
    """Captions in the data and text_encoder "none" give the very model that data without captions gives."""
    plain = train(captioned, "plain_none", text_encoder="none", steps=10)
    model, artifact = load_transformer(plain)
    assert model.tokenizer is None and not hasattr(model, "text_encoder")
    assert artifact.config["shape"].keys() == {"kind", "lr_vocab", "hr_vocab", "lr_len", "hr_len", "num_labels",
                                               "label_names"}
    assert not set(artifact.config["transformer"]) & {"text_encoder", "text_layers", "caption_dropout",
                                                       "max_caption_words"}
    records, info = read_records(captioned["fmaps"])
    stripped = tmp_path / "fmaps" / "dataset.json"
    stripped.parent.mkdir()
    (stripped.parent / "shards").symlink_to(captioned["fmaps"].parent / "shards")
    write_dataset_json(stripped, [{k: v for k, v in r.items() if k != "caption"} for r in records], info)
    other = transformer.run(transformer.TransformerArgs(
        dataset_path=stripped, lr_codebook_path=captioned["cond"], hr_codebook_path=captioned["l1"],
        config_path=captioned["root"] / "plain_none.json", base=True, test_num_sample=0,
        options=options(tmp_path / "run", batch_size=8, max_epoch=100, max_steps=10)))
    same = load_artifact(other)
    assert same.config == artifact.config and same.tensors.keys() == artifact.tensors.keys()
    assert all(torch.equal(same.tensors[k], artifact.tensors[k]) for k in same.tensors)


# ---------------------------------------------------------------- guidance and dropout

def text_model(kind: str) -> TokenTransformer:
    tokenizer = Tokenizer.build(["a red circle", "a blue square"], 8)
    shape = TokenShape(kind, coarse_vocab=5, fine_vocab=7, coarse_len=1 if kind == "base" else 4, fine_len=6,
                       num_labels=2, label_names=["x", "y"], text=tokenizer.to_record())
    torch.manual_seed(0)
    return TokenTransformer(TransformerConfig(**SMALL), shape).eval()


@pytest.mark.parametrize("kind", ["base", "cascade"])
def test_guidance_towards_the_caption_and_label(kind):
    model = text_model(kind)
    tokenizer = model.tokenizer
    labels, text = torch.tensor([0, 1, 2]), tokenizer.encode_all(["a red circle", "blue square", None])
    coarse = torch.randint(0, 5, (3, model.shape.coarse_len), generator=torch.Generator().manual_seed(1))
    fine = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(2))
    plain = teacher_forced(model, labels, coarse, fine, True, 1.0, text=text)
    unconditional = teacher_forced(model, torch.full_like(labels, 2), coarse, fine, True, 1.0,
                                   text=tokenizer.encode_all([None] * 3))
    assert torch.allclose(teacher_forced(model, labels, coarse, fine, True, 0.0, text=text), unconditional, atol=1e-5)
    assert torch.allclose(teacher_forced(model, labels, coarse, fine, True, 3.0, text=text),
                          unconditional + 3 * (plain - unconditional), atol=1e-4)
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(3)]
    guided_once = generate_tokens(model, labels, coarse, DecodeSettings(guidance_scale=1.0), generators(), text=text)
    assert torch.equal(guided_once, generate_tokens(model, labels, coarse, DecodeSettings(), generators(), text=text))
    if kind == "base":
        plain_condition = model.condition_logits(labels, text)
        assert torch.equal(condition_tokens(model, labels, text, DecodeSettings(temperature=0), generators()),
                           plain_condition.argmax(-1, keepdim=True))


def test_caption_dropout_rates():
    cfg = TransformerConfig(caption_dropout=0.2, label_dropout=0.1)
    null = [1, 0, 0]
    labels, text = torch.zeros(20000, dtype=torch.long), torch.full((20000, 3), 5)
    torch.manual_seed(0)
    dropped_labels, dropped_text = drop_conditions(labels, text, cfg, 9, null)
    no_label, no_caption = dropped_labels == 9, (dropped_text == torch.tensor(null)).all(1)
    assert (dropped_text[~no_caption] == 5).all() and set(dropped_labels.tolist()) == {0, 9}
    assert abs((no_label & no_caption).float().mean() - (0.2 + 0.8 * 0.1 * 0.2)) < 0.01  # unconditional
    assert abs((no_caption & ~no_label).float().mean() - 0.8 * 0.2 * 0.9) < 0.01  # the label alone
    assert abs((no_label & ~no_caption).float().mean() - 0.8 * 0.1 * 0.8) < 0.01  # the caption alone


def test_a_tiny_text_model_learns_to_tell_two_captions_apart():
    """Two captions, each with its own condition token and sequence: after training, each prompt gives its own."""
    model = text_model("base").train()
    tokenizer = model.tokenizer
    text = tokenizer.encode_all(["a red circle", "a blue square"])
    labels, coarse = torch.full((2,), 2), torch.tensor([[1], [3]])
    fine = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 5, 4, 3, 2, 1]])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    positions = torch.arange(6).expand(2, 6)
    for _ in range(150):
        logits, condition = model(labels, coarse, decoder_input(fine, 7), positions, text=text, with_condition=True)
        loss = F.cross_entropy(logits.reshape(-1, 7), fine.reshape(-1)) + F.cross_entropy(condition, coarse[:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    greedy = DecodeSettings(temperature=0)
    cond = condition_tokens(model, labels, text, greedy, [None, None])
    assert torch.equal(cond, coarse)
    assert torch.equal(generate_tokens(model, labels, cond, greedy, [None, None], text=text), fine)


# ---------------------------------------------------------------- prompts at generation

def generate(models: dict, config, out, *extra):
    return run_script("generate_images.py", "--config-path", config, "--decoder-path", models["autoencoder"],
                      "--out-dir", out, "--device", "cpu", *map(str, extra))


def test_prompts_are_recorded_and_an_unknown_word_is_one_line(tmp_path, text_models):
    config = write_config(tmp_path / "g.json", text_models["levels"], prompt="a bright circle", guidance_scale=2.0)
    result = generate(text_models, config, tmp_path / "out", "--num-images", 4, "--batch-size", 3)
    assert result.returncode == 0, result.stderr
    records, _ = read_records(tmp_path / "out" / "dataset.json")
    assert all(r["caption"] == "a bright circle" and r["labels"] == [] for r in records)
    run = read_table(tmp_path / "out" / "dataset.json", "runs")[0]
    assert run["levels"][0]["prompt"] == "a bright circle"
    assert "prompt" not in run["levels"][1]  # level 1 reads level 0's
    again = generate(text_models, config, tmp_path / "again", "--num-images", 4, "--batch-size", 4)
    assert again.returncode == 0
    image = "images/000/000003.png"
    assert (tmp_path / "out" / image).read_bytes() == (tmp_path / "again" / image).read_bytes()

    bad = write_config(tmp_path / "bad.json", text_models["levels"], prompt="a brigth sqare")
    result = generate(text_models, bad, tmp_path / "bad")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "unknown words 'brigth' (nearest known: 'bright'" in result.stderr and "'sqare'" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_a_prompt_for_a_model_without_captions_is_refused(tmp_path, models):
    levels = json.loads(models["generate_config"].read_text())
    config = write_config(tmp_path / "g.json", levels, prompt="a circle")
    result = generate(models, config, tmp_path / "out")
    assert result.returncode == 2 and "was trained without captions" in result.stderr


def test_a_file_of_prompts_gives_one_set_each(tmp_path, text_models):
    config = write_config(tmp_path / "g.json", text_models["levels"])
    (tmp_path / "prompts.txt").write_text("# two prompts\na dim square\n\na bright bar\n")
    result = generate(text_models, config, tmp_path / "out", "--num-images", 3, "--prompts-file", tmp_path / "prompts.txt")
    assert result.returncode == 0, result.stderr
    sets = json.loads((tmp_path / "out" / "prompts.json").read_text())["sets"]
    assert [(s["prompt"], s["folder"], s["seed"]) for s in sets] == [("a dim square", "set_000", 0),
                                                                   ("a bright bar", "set_001", 1)]
    data = load_image_dataset(tmp_path / "out" / "dataset.json")  # a captioned dataset the stages accept
    assert [r["caption"] for r in data.records] == ["a dim square"] * 3 + ["a bright bar"] * 3
    assert (tmp_path / "out" / "grid.png").exists()
    (tmp_path / "bad.txt").write_text("a dim square\na purple square\n")
    result = generate(text_models, config, tmp_path / "bad", "--prompts-file", tmp_path / "bad.txt")
    assert result.returncode == 2 and "bad.txt line 2" in result.stderr and "'purple'" in result.stderr
    assert not (tmp_path / "bad" / "set_000").exists()


# ---------------------------------------------------------------- the report's prompt agreement

def test_informative_words_and_unseen_prompts():
    training = ["a red circle", "a blue square", "a red square", "a blue circle at the top"] * 5
    vocab = prompt_agreement.informative_words(training)
    assert vocab == ["blue", "circle", "red", "square", "top"]
    train_named = prompt_agreement.named(training, vocab)
    unseen = prompt_agreement.unseen_prompts(["a red circle", "a red circle at the top", "a blue circle at the top"],
                                             train_named, vocab)
    assert unseen.tolist() == [False, True, False]
    asked = prompt_agreement.named(["a red circle", "a blue square"], vocab)
    seen = torch.tensor([[False, True, True, False, False], [False, False, False, True, True]])
    result = prompt_agreement.agreement(asked, seen, vocab)
    assert result["per_word"] == {"blue": 0.0, "circle": 1.0, "red": 1.0, "square": 1.0}
    assert result["overall"] == 0.75 and result["all_words"] == 0.5


def test_the_report_measures_prompt_agreement(tmp_path, text_models):
    config = write_config(tmp_path / "g.json", text_models["levels"], guidance_scale=3.0)
    (tmp_path / "prompts.txt").write_text("a dim square\na bright circle\n")
    assert generate(text_models, config, tmp_path / "gen", "--num-images", 6,
                    "--prompts-file", tmp_path / "prompts.txt").returncode == 0
    result = run_script("evaluate.py", "--real-path", text_models["data"], "--generated-path",
                        tmp_path / "gen" / "dataset.json", "--out-dir", tmp_path / "report", "--num-images", 12,
                        "--classifier-steps", 5, "--prompt-classifier-steps", 60, "--k", 2, "--no-downstream",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    prompts = report["prompts"]
    assert prompts["words"] == ["bar", "bright", "circle", "dim", "square"]
    assert prompts["generated"]["images"] == 12 and prompts["generated_seen"]["prompts"] == 2
    assert 0.0 <= prompts["real_heldout"]["overall"] <= 1.0
    assert "## Prompt agreement" in (tmp_path / "report" / "report.md").read_text()
