import json

import pytest
import torch

from conftest import run_script
from core.data import load_image_dataset
from core.models.sampling import DecodeSettings, DecodeState, beam_search, generate_tokens
from core.models.transformer import sequence_logits
from test_transformer import make, random_inputs


def teacher_forced(model, labels, lr, hr, use_cache, scale=1.0):
    """Logits at every position from the DecodeState, fed the given tokens."""
    dec = DecodeState(model, labels, lr, scale, use_cache)
    rows = []
    for p in range(hr.shape[1]):
        rows.append(dec.logits_at(p))
        dec.set(p, hr[:, p])
    return torch.stack(rows, 1)


@pytest.mark.parametrize("kind", ["base", "cascade"])
@pytest.mark.parametrize("window", [None, 4, 5])
def test_cached_and_uncached_logits_agree(kind, window):
    model = make(kind, fine_len=13, window=window)
    labels, lr, hr = random_inputs(model)
    reference = sequence_logits(model, labels, lr, hr)
    cached = teacher_forced(model, labels, lr, hr, use_cache=True)
    uncached = teacher_forced(model, labels, lr, hr, use_cache=False)
    assert torch.allclose(cached, reference, atol=1e-5)
    assert torch.allclose(uncached, reference, atol=1e-5)


def sequence_logprob(model, labels, lr, tokens):
    logits = sequence_logits(model, labels, lr, tokens).log_softmax(-1)
    return logits.gather(2, tokens[:, :, None]).squeeze(2).sum(1)


@pytest.mark.parametrize("kind", ["base", "cascade"])
def test_beam_width_one_is_greedy_and_wider_beams_score_higher(kind):
    model = make(kind, window=5)
    labels, lr, _ = random_inputs(model, batch=4)
    greedy = generate_tokens(model, labels, lr, DecodeSettings(temperature=0), [None] * 4)
    beam1 = beam_search(DecodeState(model, labels, lr), beams=1)
    assert torch.equal(greedy, beam1)
    beam4 = beam_search(DecodeState(model, labels, lr), beams=4)
    assert (sequence_logprob(model, labels, lr, beam4) >= sequence_logprob(model, labels, lr, greedy) - 1e-5).all()


def test_guidance_scale():
    model = make("cascade")
    labels, lr, hr = random_inputs(model)
    labels = labels.clamp(max=model.shape.num_labels - 1)
    plain = teacher_forced(model, labels, lr, hr, True)
    assert torch.equal(teacher_forced(model, labels, lr, hr, True, scale=1.0), plain)
    null = torch.full_like(labels, model.shape.null_label)
    unconditional = teacher_forced(model, null, lr, hr, True)
    assert torch.allclose(teacher_forced(model, labels, lr, hr, True, scale=0.0), unconditional, atol=1e-5)
    guided = teacher_forced(model, labels, lr, hr, True, scale=3.0)
    assert torch.allclose(guided, unconditional + 3 * (plain - unconditional), atol=1e-4)


def test_top_k_one_is_greedy_and_rank_search_runs():
    model = make("base", window=5)
    labels, lr, _ = random_inputs(model, batch=3)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    greedy = generate_tokens(model, labels, lr, DecodeSettings(temperature=0), gens)
    assert torch.equal(generate_tokens(model, labels, lr, DecodeSettings(top_k=1), gens), greedy)
    ranked = generate_tokens(model, labels, lr, DecodeSettings(beam_width=4, num_beam=3), gens)
    assert ranked.shape == greedy.shape and ranked.max() < model.shape.fine_vocab


def generate_cli(models, out, *extra):
    return run_script("generate_images.py", "--config-path", models["generate_config"], "--decoder-path",
                      models["autoencoder"], "--out-dir", out, "--device", "cpu", *map(str, extra))


def test_generation_records_and_batch_size_independence(tmp_path, models):
    a, b = tmp_path / "a", tmp_path / "b"
    result = generate_cli(models, a, "--num-images", 10, "--batch-size", 10, "--seed", 7)
    assert result.returncode == 0, result.stderr
    assert generate_cli(models, b, "--num-images", 10, "--batch-size", 3, "--seed", 7).returncode == 0
    for i in range(10):
        assert (a / "images" / f"{i:06d}.png").read_bytes() == (b / "images" / f"{i:06d}.png").read_bytes()
    raw = json.loads((a / "dataset.json").read_text())["_default"]
    assert len(raw) == 10
    record = raw["1"]
    assert record["image_fpath"] == "images/000000.png" and record["provenance"]["seed"] == 7
    levels = record["provenance"]["levels"]
    assert [len(level["model"]["sha256"]) for level in levels] == [64, 64]
    assert levels[1]["top_k"] == 8 and len(record["provenance"]["decoder"]["sha256"]) == 64
    data = load_image_dataset(a / "dataset.json")  # the output is a dataset the stages accept
    assert data.items.shape == (10, 1, 16, 16) and set(data.label_names) <= {"bar", "circle", "square"}
    assert (a / "grid.png").exists()


def test_same_seed_same_images_other_seed_differs(tmp_path, models):
    generate_cli(models, tmp_path / "a", "--num-images", 4, "--seed", 1)
    generate_cli(models, tmp_path / "b", "--num-images", 4, "--seed", 2)
    a = load_image_dataset(tmp_path / "a" / "dataset.json").items
    b = load_image_dataset(tmp_path / "b" / "dataset.json").items
    assert not torch.equal(a, b)


def test_generation_continues_after_interruption(tmp_path, models):
    out = tmp_path / "g"
    assert generate_cli(models, out, "--num-images", 6, "--batch-size", 2).returncode == 0
    before = (out / "images" / "000004.png").read_bytes()
    (out / "images" / "000004.png").unlink()
    (out / "dataset.json").unlink()
    result = generate_cli(models, out, "--num-images", 6, "--batch-size", 2)
    assert result.returncode == 0, result.stderr
    assert (out / "images" / "000004.png").read_bytes() == before
    changed = generate_cli(models, out, "--num-images", 6, "--seed", 3)
    assert changed.returncode == 2 and "holds a run with another config" in changed.stderr


def test_mismatched_levels_are_refused(tmp_path, models):
    config = json.loads(models["generate_config"].read_text())
    config["1"]["lr_codebook_path"] = config["0"]["lr_codebook_path"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(config))
    result = run_script("generate_images.py", "--config-path", bad, "--decoder-path", models["autoencoder"],
                        "--out-dir", tmp_path / "out")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "was trained with lr_codebook" in result.stderr
    config = json.loads(models["generate_config"].read_text())
    config["0"]["temprature"] = 1.0
    bad.write_text(json.dumps(config))
    result = run_script("generate_images.py", "--config-path", bad, "--decoder-path", models["autoencoder"],
                        "--out-dir", tmp_path / "out")
    assert result.returncode == 2 and "unknown key 'temprature' (did you mean 'temperature'?)" in result.stderr
    assert not (tmp_path / "out").exists()
