import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import (build_dataset, generate_cli, generated_files, random_inputs, run_script, small_transformer,
                      start_script, teacher_forced, wait_paused)
from core.artifacts import load_artifact, save_artifact
from core.data import load_image_dataset, read_records, write_records
from core.models.sampling import DecodeSettings, DecodeState, beam_search, generate_tokens, uniform_draws
from core.stages import evaluate, fmaps
from core.report.sets import at_source_size
from core.stages.generate import open_log, read_progress
from core.models.transformer import sequence_logits


@pytest.mark.parametrize("kind", ["base", "cascade"])
@pytest.mark.parametrize("window", [None, 4, 5])
def test_cached_and_uncached_logits_agree(kind, window):
    model = small_transformer(kind, fine_len=13, window=window)
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
    model = small_transformer(kind, window=5)
    labels, lr, _ = random_inputs(model, batch=4)
    greedy = generate_tokens(model, labels, lr, DecodeSettings(temperature=0), [None] * 4)
    beam1 = beam_search(DecodeState(model, labels, lr), beams=1)
    assert torch.equal(greedy, beam1)
    beam4 = beam_search(DecodeState(model, labels, lr), beams=4)
    assert (sequence_logprob(model, labels, lr, beam4) >= sequence_logprob(model, labels, lr, greedy) - 1e-5).all()


def test_guidance_scale():
    model = small_transformer("cascade")
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
    model = small_transformer("base", window=5)
    labels, lr, _ = random_inputs(model, batch=3)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    greedy = generate_tokens(model, labels, lr, DecodeSettings(temperature=0), gens)
    assert torch.equal(generate_tokens(model, labels, lr, DecodeSettings(top_k=1), gens), greedy)
    ranked = generate_tokens(model, labels, lr, DecodeSettings(beam_width=4, num_beam=3), gens)
    assert ranked.shape == greedy.shape and ranked.max() < model.shape.fine_vocab


def test_uniform_draws_are_the_draws_of_each_step():
    """Drawn at once, the numbers are those that one draw per row and step would give (same tokens)."""
    shared = torch.Generator().manual_seed(3)
    generators = [torch.Generator().manual_seed(i) for i in range(2)] + [shared, shared]
    drawn = uniform_draws(generators, steps=5)
    replay = [torch.Generator().manual_seed(i) for i in range(2)] + [torch.Generator().manual_seed(3)] * 2
    stepwise = torch.stack([torch.cat([torch.rand(1, generator=g) for g in replay]) for _ in range(5)])
    assert torch.equal(drawn, stepwise)


@pytest.mark.parametrize("search", [DecodeSettings(beam_width=3, search="beam"), DecodeSettings(beam_width=4, num_beam=3)])
def test_beam_and_rank_search_same_with_and_without_cache(search):
    model = small_transformer("cascade", fine_len=13, window=5)
    labels, lr, _ = random_inputs(model, batch=3)
    tokens = [generate_tokens(model, labels, lr, search, [torch.Generator().manual_seed(i) for i in range(3)], cache)
              for cache in (True, False)]
    assert torch.equal(tokens[0], tokens[1])


def test_generation_records_and_batch_size_independence(tmp_path, models):
    a, b = tmp_path / "a", tmp_path / "b"
    result = generate_cli(models, a, "--num-images", 10, "--batch-size", 10, "--seed", 7)
    assert result.returncode == 0, result.stderr
    assert generate_cli(models, b, "--num-images", 10, "--batch-size", 3, "--seed", 7).returncode == 0
    for i in range(10):
        assert (a / "images" / "000" / f"{i:06d}.png").read_bytes() == (b / "images" / "000" / f"{i:06d}.png").read_bytes()
    raw = json.loads((a / "dataset.json").read_text())
    assert len(raw["_default"]) == 10
    record = raw["_default"]["10"]
    assert set(record) == {"image_fpath", "labels", "split", "index", "run"}
    assert record["image_fpath"] == "images/000/000009.png" and record["index"] == 9 and record["run"] == 1
    run = raw["runs"][str(record["run"])]  # the provenance, once
    assert run["seed"] == 7 and run["num_images"] == 10 and run["batch_size"] == 10
    assert [len(level["model"]["sha256"]) for level in run["levels"]] == [64, 64]
    assert run["levels"][1]["top_k"] == 8 and len(run["decoder"]["sha256"]) == 64
    data = load_image_dataset(a / "dataset.json")  # the output is a dataset the stages accept
    assert data.items.shape == (10, 1, 16, 16) and set(data.label_names) <= {"bar", "circle", "square"}
    assert (a / "grid.png").exists()


def test_records_do_not_grow_with_levels(tmp_path, models):
    one_level = tmp_path / "one.json"
    one_level.write_text(json.dumps({"0": json.loads(models["generate_config"].read_text())["0"]}))
    for name, config in (("one", one_level), ("two", models["generate_config"])):
        assert generate_cli(models, tmp_path / name, "--num-images", 5, config=config).returncode == 0
    one, two = (json.loads((tmp_path / name / "dataset.json").read_text()) for name in ("one", "two"))
    assert one["_default"] == two["_default"]  # the same labels are drawn first, and records name no level
    assert len(one["runs"]["1"]["levels"]) == 1 and len(two["runs"]["1"]["levels"]) == 2


def test_same_seed_same_images_other_seed_differs(tmp_path, models):
    generate_cli(models, tmp_path / "a", "--num-images", 4, "--seed", 1)
    generate_cli(models, tmp_path / "b", "--num-images", 4, "--seed", 2)
    a = load_image_dataset(tmp_path / "a" / "dataset.json").items
    b = load_image_dataset(tmp_path / "b" / "dataset.json").items
    assert not torch.equal(a, b)


@pytest.mark.slow
def test_sigkill_then_restart_equals_uninterrupted(tmp_path, models):
    flags = ["--num-images", 600, "--batch-size", 4, "--seed", 5]
    reference = tmp_path / "reference"
    assert generate_cli(models, reference, *flags).returncode == 0
    killed = tmp_path / "killed"
    proc = start_script("generate_images.py", "--config-path", models["generate_config"], "--decoder-path",
                        models["autoencoder"], "--out-dir", killed, "--device", "cpu", *map(str, flags), pause_at=3)
    wait_paused(proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 3 <= len(read_progress(killed / "progress")) < 150 and not (killed / "dataset.json").exists()
    result = generate_cli(models, killed, *flags)
    assert result.returncode == 0, result.stderr
    assert generated_files(killed) == generated_files(reference)


@pytest.mark.slow
def test_generation_continues_after_interruption(tmp_path, models):
    out = tmp_path / "g"
    assert generate_cli(models, out, "--num-images", 6, "--batch-size", 2).returncode == 0
    before = generated_files(out)
    log = out / "progress" / "0.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[2] + "\n" + lines[1][:10])  # batch 1 lost, the last line cut short
    (out / "images" / "000" / "000002.png").write_bytes(b"half a png")
    (out / "dataset.json").unlink()
    result = generate_cli(models, out, "--num-images", 6, "--batch-size", 3)
    assert result.returncode == 0, result.stderr
    assert "continues with them" in result.stderr  # batches are fixed by the run's first batch size
    assert generated_files(out) == before
    changed = generate_cli(models, out, "--num-images", 6, "--seed", 3)
    assert changed.returncode == 2 and "holds a run with another config" in changed.stderr
    assert generate_cli(models, out, "--num-images", 3, "--seed", 3, "--overwrite").returncode == 0
    assert len(generated_files(out)) == 4 and len(read_progress(out / "progress")) == 1


def test_progress_log_ends_on_a_whole_line(tmp_path):
    log = tmp_path / "progress" / "0.jsonl"
    log.parent.mkdir()
    log.write_text('{"batch": 0, "labels": [1, -1]}\n{"batch": 1, "lab')
    assert read_progress(log.parent) == {0: [1, -1]}
    assert open_log(log.parent, 0) == log and log.read_text() == '{"batch": 0, "labels": [1, -1]}\n'


def test_every_stage_reads_the_generated_dataset(tmp_path, models):
    out = tmp_path / "gen"
    assert generate_cli(models, out, "--num-images", 7, "--batch-size", 3).returncode == 0
    data = load_image_dataset(out / "dataset.json")
    records, info = read_records(out / "dataset.json")
    assert info["kind"] == "generated" and [r["index"] for r in records] == list(range(7))
    # past a file's worth of records, part files beside dataset.json hold the rest
    parted = out / "parted.json"
    write_records(parted, iter(records), info, per_file=3)
    assert json.loads(parted.read_text())["info"]["1"]["record_files"] == ["parted-0001.json", "parted-0002.json"]
    assert torch.equal(load_image_dataset(parted).items, data.items)
    subset = tmp_path / "subset"  # build_dataset.py takes a dataset.json as its source
    build_dataset(parted, subset, size=16, holdout=0.0)
    assert len(read_records(subset / "dataset.json")[0]) == 7
    encoded = fmaps.run(fmaps.FmapArgs(dataset_path=parted, model_path=models["autoencoder"], out_dir=tmp_path / "fm",
                                       device="cpu"))
    assert encoded["items"] == 7


def test_unwritable_images_folder_is_one_line(tmp_path, models):
    out = tmp_path / "g"
    out.mkdir()
    (out / "images").write_text("a file where the images folder goes")
    result = generate_cli(models, out, "--num-images", 2)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot write the images in {out}: ")


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


def test_set_changes_a_setting_as_the_file_would_and_the_run_writes_its_config(tmp_path, models):
    """--set 1.temperature=... gives the images of a file that says so; generate.json in the out dir reads back
    (its paths relative to it) and makes the same images."""
    config = json.loads(models["generate_config"].read_text())
    config["1"]["temperature"] = 0.5
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(config))
    assert generate_cli(models, tmp_path / "file", "--num-images", 4, config=edited).returncode == 0
    result = generate_cli(models, tmp_path / "set", "--num-images", 4, "--set", "1.temperature=0.5")
    assert result.returncode == 0, result.stderr
    assert generated_files(tmp_path / "file") == generated_files(tmp_path / "set")
    written = tmp_path / "set" / "generate.json"
    assert json.loads(written.read_text())["1"]["temperature"] == 0.5
    assert not Path(json.loads(written.read_text())["0"]["model_path"]).is_absolute()
    assert generate_cli(models, tmp_path / "again", "--num-images", 4, config=written).returncode == 0
    images = lambda out: {k: v for k, v in generated_files(out).items() if k != "dataset.json"}  # paths differ
    assert images(tmp_path / "again") == images(tmp_path / "set")


@pytest.mark.parametrize("override, message", [
    ("1.temprature=0.5", "level 1: unknown key 'temprature' (did you mean 'temperature'?)"),
    ("2.temperature=0.5", "--set 2.temperature=0.5: no level 2 (the config has levels 0 to 1)"),
    ("temperature=0.5", "--set temperature=0.5: expected LEVEL.KEY=VALUE (e.g. 0.guidance_scale=1.5)"),
    ("0.top_p=2", "level 0: 'top_p' is 2.0, must be between 0.0 and 1.0"),
])
def test_a_bad_set_is_refused_in_one_line(tmp_path, models, override, message):
    result = generate_cli(models, tmp_path / "out", "--set", override)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr and not (tmp_path / "out").exists()


def test_images_come_back_at_the_source_size(tmp_path, models):
    """A decoder trained on padded images (as build_dataset.py pads 28x28 into 32x32; here 12x12 into 16x16):
    its images are cut back to the source's size, unless --full-size; the report compares them with the real
    images cut the same way."""
    artifact = load_artifact(models["autoencoder"])
    padded = tmp_path / "padded_ae.safetensors"
    save_artifact(padded, artifact.tensors, artifact.kind, artifact.config, artifact.provenance,
                  {**artifact.extra, "images": {"size": 16, "channels": 1, "fit": "pad", "content_size": [12, 12]}})
    assert generate_cli(models, tmp_path / "cut", "--num-images", 3, decoder=padded).returncode == 0
    assert generate_cli(models, tmp_path / "full", "--num-images", 3, "--full-size", decoder=padded).returncode == 0
    cut, full = (load_image_dataset(tmp_path / name / "dataset.json").items for name in ("cut", "full"))
    assert cut.shape == (3, 1, 12, 12) and full.shape == (3, 1, 16, 16)
    assert torch.equal(cut, full[..., 2:14, 2:14])
    assert json.loads((tmp_path / "cut" / "dataset.json").read_text())["runs"]["1"]["cropped_to"] == [12, 12]

    real = load_image_dataset(models["dataset"])
    padded_real = replace(real, info={**real.info, "fit": "pad", "content_size": [12, 12]})
    generated = load_image_dataset(tmp_path / "cut" / "dataset.json")
    assert torch.equal(at_source_size(padded_real, generated.items.shape[-2:]).items, real.items[..., 2:14, 2:14])
    assert at_source_size(real, generated.items.shape[-2:]).items.shape[-1] == 16  # a build that did not pad: nothing to cut

    # the report on them: real images cut the same way, the tokenizer ceiling reads them as stored
    records, info = read_records(models["dataset"])
    folder = models["dataset"].parent
    write_records(tmp_path / "padded_real.json", [{**r, "image_fpath": str(folder / r["image_fpath"])} for r in records],
                  {**info, "fit": "pad", "content_size": [12, 12]})
    report = evaluate.run(evaluate.EvalArgs(tmp_path / "padded_real.json", tmp_path / "cut" / "dataset.json",
                                            tmp_path / "report", num_images=20, classifier_steps=5, k=2, tsne_steps=5,
                                            downstream=False, autoencoder_path=padded, codebook_paths=[models["l2"]],
                                            device="cpu"))
    rows = report["tokenizer_ceiling"]["rows"]
    assert [row["images"].split(" (")[0] for row in rows][:2] == ["real images as stored", "autoencoder"]
    assert len(rows) == 4 and all(row["spaces"]["pixel_pca"]["frechet_distance"] >= 0 for row in rows)
