"""The Makefile chain end to end on a very small configuration, and its resume after an interruption."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_AE, script_env, write_colour_folder, write_shape_folder
from core.artifacts import load_artifact

pytestmark = pytest.mark.slow  # the slow tier: make test-all

TINY_TRANSFORMER = {"in_dim": 32, "hidden_dim": 64, "num_dec_layers": 1, "num_enc_layers": 1,
                    "self_attn_heads": 2, "cross_attn_heads": 2, "model_lr": 0.003, "warmup_steps": 2}


def write_preset(configs: Path) -> None:
    """A preset named 'test' for 16x16 images (configs/test16): (2, 8, 8) feature maps, three codebook levels."""
    folder = configs / "test16"
    folder.mkdir(parents=True)
    (folder / "autoencoder.json").write_text(json.dumps(TINY_AE))
    for name, patch, units in (("cond", "map", 8), ("l1", 4, 16), ("l2", 2, 32)):
        (folder / f"codebook_{name}.json").write_text(json.dumps(
            {"patch_H": patch, "patch_W": patch, "num_embeddings": units}))
    for kind in ("base", "cascade"):
        (folder / f"transformer_{kind}.json").write_text(json.dumps(TINY_TRANSFORMER))
    shutil.copy(ROOT / "configs" / "tiny32" / "generate.json", folder / "generate.json")
    quick = {"clusters": 4, "cluster_steps": 3, "quant_steps": 2}
    (folder / "compress_autoencoder.json").write_text(json.dumps(quick))
    (folder / "compress_transformer.json").write_text(json.dumps(quick))
    (folder / "steps.mk").write_text("AE_STEPS ?= 20\nAE_EPOCHS ?= 100\nCB_STEPS ?= 10\nCB_EPOCHS ?= 100\n"
                                     "CB_BATCH ?= 8\nBASE_STEPS ?= 10\nBASE_EPOCHS ?= 100\nCASCADE_STEPS ?= 10\n"
                                     "CASCADE_EPOCHS ?= 100\nBATCH ?= 8\nCHECKPOINT_STEP ?= 1000\n")


def make(runs: Path, configs: Path, source: Path, *extra: str, target: str = "demo") -> subprocess.CompletedProcess:
    """make `target` on the small preset, one stage at a time (JOBS=1: the stage order is checked); `extra`
    flags and settings come last (a later setting wins)."""
    venv = Path(sys.executable).parent.parent
    command = ["make", "-o", f"{venv}/.installed", target, f"VENV={venv}", f"RUNS={runs}", f"CONFIGS={configs}",
               "PRESET=test", f"SOURCE={source}", "SIZE=16", "DEVICE=cpu", "NUM_IMAGES=6", "PRUNE_THRESHOLD=1",
               "REPORT_FLAGS=--num-images 6 --classifier-steps 5 --k 2 --downstream-steps 3 --downstream-seeds 1",
               "CURATE_FLAGS=--teacher-steps 5 --choice-steps 3 --choice-seeds 1", "JOBS=1",
               *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=script_env(), cwd=ROOT)


def test_make_demo_runs_the_chain_and_resumes_and_a_new_folder_tunes_from_it(tmp_path, image_folder):
    runs = check_demo_chain(tmp_path, image_folder)
    check_tuned_chain(tmp_path, runs)


def test_stages_side_by_side_make_what_one_at_a_time_makes(tmp_path, image_folder):
    """make demo with JOBS=2 runs independent stages at once (one thread each here) and ends with the same
    artifacts and images as JOBS=1; no stamp is older than what its stage wrote."""
    write_preset(tmp_path / "configs")
    chains = {}
    for jobs in (1, 2):
        runs = tmp_path / f"jobs{jobs}"
        result = make(runs, tmp_path / "configs", image_folder, f"JOBS={jobs}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        chains[jobs] = runs
    files = sorted(p.relative_to(chains[1]) for p in chains[1].rglob("*")
                   if p.suffix in (".safetensors", ".png") and p.parent.name != "samples")
    assert len(files) > 50 and files == sorted(p.relative_to(chains[2]) for p in chains[2].rglob("*")
                                               if p.suffix in (".safetensors", ".png") and p.parent.name != "samples")
    for name in files:
        one, two = chains[1] / name, chains[2] / name
        if name.suffix == ".png":
            assert one.read_bytes() == two.read_bytes(), name
        else:
            a, b = load_file(one), load_file(two)  # the tensors (the metadata names each run's paths)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for stamp in chains[2].rglob("DONE"):
        written = [p.stat().st_mtime for p in stamp.parent.rglob("*") if p.is_file() and p != stamp]
        assert stamp.stat().st_mtime >= max(written, default=0), stamp
    timings = (chains[2] / "timings.log").read_text()
    assert timings.index("codebook l2") < timings.index("base transformer")  # the order of what depends


def check_tuned_chain(tmp_path: Path, init: Path) -> None:
    """make report INIT=<the chain>: a folder with a label the chain never saw reuses its autoencoder and
    codebooks, tunes its transformers, which learn the new label, and generates the folder's labels."""
    source = write_shape_folder(tmp_path / "new", 16, {"stick": 2, "square": 1}, seed=9000)
    runs = tmp_path / "tuned"
    result = make(runs, tmp_path / "configs", source, f"INIT={init}", "TUNE_STEPS=4", target="report")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = [line.split(":")[0] for line in (runs / "timings.log").read_text().splitlines() if ": " in line]
    assert stages == ["dataset", "fmaps", "base transformer", "cascade transformer", "generate", "curate", "report"]
    artifact = load_artifact(runs / "transformers" / "base" / "model.safetensors")
    assert artifact.extra["label_origin"] == {"pretrained": ["bar", "circle", "square"], "tuned": ["square", "stick"]}
    assert artifact.provenance["step"] <= 4
    records = json.loads((runs / "generated" / "dataset.json").read_text())["_default"].values()
    assert {r["labels"][0] for r in records} <= {"square", "stick"}
    assert "python" not in make(runs, tmp_path / "configs", source, f"INIT={init}", "TUNE_STEPS=4", "-n",
                               target="report").stdout


def test_make_with_an_init_that_is_not_a_trained_run_says_so(tmp_path):
    venv = Path(sys.executable).parent.parent
    result = subprocess.run(["make", "-n", "-o", f"{venv}/.installed", "report", f"VENV={venv}", f"INIT={tmp_path}"],
                            capture_output=True, text=True, timeout=60, env=script_env(), cwd=ROOT)
    assert result.returncode != 0
    assert f"INIT={tmp_path} is not a trained run: {tmp_path}/transformers/base/DONE is missing" in result.stderr


def test_make_demo_on_an_unlabelled_colour_folder_ends_with_every_report_and_the_export(tmp_path):
    """A flat folder (no labels) of colour images: the reports compare in pixel-PCA space, none asks for the
    main report's classifier, and every stamp is there; resume as for labelled images."""
    folder = write_colour_folder(tmp_path / "flat", 48)
    runs = check_demo_chain(tmp_path, folder)
    assert not (runs / "report" / "classifier.safetensors").exists()
    for report in ("report", "report_compressed", "report_export"):
        assert set(json.loads((runs / report / "report.json").read_text())["spaces"]) == {"pixel_pca"}
    assert json.loads((runs / "data" / "dataset.json").read_text())["info"]["1"]["channels"] == 3


def check_demo_chain(tmp_path: Path, source: Path) -> Path:
    """make demo on `source` runs every stage and leaves every stamp; an interrupted stage reruns with what
    follows it; a finished chain has nothing left to do; other settings for a stage start it over."""
    runs, configs = tmp_path / "runs", tmp_path / "configs"
    write_preset(configs)
    result = make(runs, configs, source)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads((runs / "generated" / "dataset.json").read_text())["_default"]
    assert len(records) == 6 and (runs / "generated" / "grid.png").exists()
    stages = [line.split(":")[0] for line in (runs / "timings.log").read_text().splitlines() if ": " in line]
    assert stages[:2] == ["dataset", "autoencoder"] and len(stages) == 22
    assert stages[-5:] == ["generate compressed", "report compressed", "export", "generate export", "report export"]
    assert (runs / "report" / "report.md").exists() and (runs / "report_compressed" / "report.md").exists()
    assert len(list((runs / "generated_compressed" / "images").glob("*/*.png"))) == 6
    assert len(list((runs / "generated_export" / "images").glob("*/*.png"))) == 6
    assert (runs / "report_export" / "report.md").exists()
    stamps = ["data", "autoencoder", "fmaps", *(f"{stage}/{level}" for stage in ("codebooks", "pruned")
                                                  for level in ("cond", "l1", "l2")),
              "transformers/base", "transformers/cascade", "generated", "curated", "report", "compressed/autoencoder",
              "compressed/base", "compressed/cascade", "generated_compressed", "report_compressed", "export",
              "generated_export", "report_export"]
    assert [s for s in stamps if not (runs / s / "DONE").exists()] == []

    # as if the cascade stage had been interrupted: make runs it and what follows from it, nothing before it
    (runs / "transformers" / "cascade" / "DONE").unlink()
    shutil.rmtree(runs / "generated")
    result = make(runs, configs, source)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = [line.split(":")[0] for line in (runs / "timings.log").read_text().splitlines() if ": " in line]
    assert stages[22] == "cascade transformer"
    assert sorted(stages[23:]) == ["compress cascade", "curate", "export", "generate", "generate compressed",
                                   "generate export", "report", "report compressed", "report export"]

    # nothing is left to do; other settings for one stage start it over, and what follows it
    assert "python" not in make(runs, configs, source, "-n").stdout
    dry_run = make(runs, configs, source, "-n", "CASCADE_STEPS=12").stdout.replace("\\\n", " ")
    planned = [line for line in dry_run.splitlines() if "python" in line]
    assert "train_transformer.py" in planned[0] and "--max-steps 12" in planned[0] and "--overwrite" in planned[0]
    assert not any(script in line for line in planned for script in ("train_autoencoder", "train_codebook", "--train-base"))

    # an interrupted stage resumes its checkpoint only when it is asked for the settings it was started with
    (runs / "transformers" / "cascade" / "DONE").unlink()
    cascade_line = lambda *extra: next(line for line in make(runs, configs, source, "-n", *extra).stdout.replace(
        "\\\n", " ").splitlines() if "train_transformer.py" in line)
    assert "--overwrite" not in cascade_line()
    assert "--overwrite" in cascade_line("CASCADE_STEPS=12")
    (runs / "transformers" / "cascade" / "DONE").touch()  # the chain as it was: finished
    return runs


def test_make_lowdata_trains_the_chain_on_a_per_class_subset(tmp_path):
    """make lowdata (dry run): the dataset keeps N training images per class, the chain runs in its own
    folder, generates LOWDATA_IMAGES images, and the report's real subset is those N per class."""
    venv = Path(sys.executable).parent.parent
    command = ["make", "-n", "-o", f"{venv}/.installed", "lowdata", f"VENV={venv}", f"RUNS={tmp_path / 'runs'}",
               "LOWDATA_PER_CLASS=20", "LOWDATA_IMAGES=300", "REPORT_FLAGS=--k 3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=script_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    planned = [line for line in result.stdout.replace("\\\n", " ").splitlines() if "python" in line]
    runs = f"{tmp_path / 'runs'}_lowdata20"
    build = next(line for line in planned if "build_dataset.py" in line)
    assert "--train-per-class 20" in build and f"--out-dir {runs}/data" in build
    trainers = [line for line in planned if "train_autoencoder.py" in line or "generate_fmap_dataset.py" in line]
    assert trainers and all(f"--dataset-path {runs}/chain_data/dataset.json" in line for line in trainers)
    generate = next(line for line in planned if "generate_images.py" in line)
    assert "--num-images 300" in generate and f"--config-path {runs}/sampling_choice/generate.json" in generate
    # the sampling settings are chosen on the chain's validation share, before generation
    choose = next(line for line in planned if "choose_sampling.py" in line)
    assert f"--real-path {runs}/chain_data/dataset.json" in choose and "--validation heldout" in choose
    assert "--criterion fidelity" in choose and planned.index(choose) < planned.index(generate)
    # and so are the curation's labels and filter: on images the generator never saw
    curate = next(line for line in planned if "curate_images.py" in line)
    assert f"--real-path {runs}/chain_data/dataset.json --validation heldout" in curate
    assert f"--out-dir {runs}/curated" in curate
    report = next(line for line in planned if "evaluate.py" in line)
    assert f"--curated-path {runs}/curated/dataset.json" in report
    assert "--downstream-per-class 20 --k 3" in report and f"--autoencoder-path {runs}/autoencoder" in report
    assert report.count("--ceiling-codebook") == 3 and "compress.py" not in result.stdout


def test_a_sampling_choice_without_a_validation_share_is_refused_in_one_line(tmp_path):
    venv = Path(sys.executable).parent.parent
    command = ["make", "-n", "-o", f"{venv}/.installed", "generate", f"VENV={venv}", f"RUNS={tmp_path / 'runs'}",
               "SAMPLING_CHOICE=fidelity"]
    # as a user types it: not inside another make (whose jobserver notice would add a line)
    env = {k: v for k, v in script_env().items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert result.returncode != 0 and "set VALIDATION_SHARE too" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def stamp_trained_chain(runs: Path) -> None:
    """The DONE stamps of a chain trained up to its transformers (for dry runs that start from it)."""
    for stage in ("autoencoder", "transformers/base", "transformers/cascade",
                  *(f"{kind}/{level}" for kind in ("codebooks", "pruned") for level in ("cond", "l1", "l2"))):
        (runs / stage).mkdir(parents=True)
        (runs / stage / "DONE").touch()


def test_make_transfer_pretrains_without_the_target_classes_and_tunes_and_trains_on_them(tmp_path):
    """make transfer (dry run, with the source chain's stamps in place): the source dataset drops every
    target class, the tuned and scratch runs keep N images of each, and the tuned run starts from the source."""
    venv = Path(sys.executable).parent.parent
    source = tmp_path / "runs_transfer" / "source"
    stamp_trained_chain(source)
    command = ["make", "-n", "-o", f"{venv}/.installed", "transfer", f"VENV={venv}", f"RUNS={tmp_path / 'runs'}",
               "TRANSFER_LABELS=Shirt Bag", "TRANSFER_PER_CLASS=20"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=script_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    planned = [" ".join(line.split()) for line in result.stdout.replace("\\\n", " ").splitlines() if "python" in line]
    builds = {line.split("--out-dir ")[1].split()[0]: line for line in planned if "build_dataset.py" in line}
    assert "--exclude-label Shirt --exclude-label Bag" in builds[f"{source}/data"]
    for run in ("tuned20", "scratch20"):
        run_dir = f"{tmp_path}/runs_transfer/{run}"
        assert "--label Shirt --label Bag --train-per-class 20" in builds[f"{run_dir}/data"]
        # the chain chooses its checkpoints on a share of the training images, not on the report's held-out split
        assert f"--source {run_dir}/data/dataset.json --from-split train --holdout 0.1" in builds[f"{run_dir}/chain_data"]
        fmaps = [line for line in planned if "generate_fmap_dataset.py" in line and f"{run_dir}/" in line]
        assert len(fmaps) == 1 and f"--dataset-path {run_dir}/chain_data/dataset.json" in fmaps[0]
        report = [line for line in planned if "evaluate.py" in line and f"{run_dir}/" in line]
        assert f"--real-path {run_dir}/data/dataset.json" in report[0]
    tuned = [line for line in planned if "train_transformer.py" in line and "/tuned20/" in line]
    assert len(tuned) == 2 and all(f"--init-from {source}/transformers/" in line for line in tuned)
    assert not any("train_autoencoder.py" in line and "/tuned20/" in line for line in planned)


def test_a_preset_takes_what_it_lacks_from_its_base_and_restarts_a_stage_when_a_base_file_changes(tmp_path):
    """A preset folder naming a base holds only its own files; make plans the base's for the rest, and a stage
    whose config names a base file in its "base" key is stale once that file changes."""
    configs = tmp_path / "configs"
    write_preset(configs)
    child = configs / "child16"
    child.mkdir()
    (child / "base").write_text("test16\n")
    shutil.copy(configs / "test16" / "steps.mk", child / "steps.mk")
    (child / "codebook_l2.json").write_text(json.dumps({"base": "../test16/codebook_l2.json", "num_embeddings": 24}))
    runs = tmp_path / "runs"
    for stage in ("data", "autoencoder", "fmaps", *(f"codebooks/{level}" for level in ("cond", "l1", "l2"))):
        (runs / stage).mkdir(parents=True)
        (runs / stage / "DONE").touch()
    venv = Path(sys.executable).parent.parent
    plan = lambda: subprocess.run(
        ["make", "-n", "-o", f"{venv}/.installed", "codebooks", f"VENV={venv}", f"RUNS={runs}", f"CONFIGS={configs}",
         "PRESET=child", "SIZE=16"], capture_output=True, text=True, timeout=60, env=script_env(), cwd=ROOT)
    planned = plan()
    assert planned.returncode == 0, planned.stderr
    assert "train_codebook.py" not in planned.stdout  # every codebook is newer than its config
    (configs / "test16" / "codebook_l2.json").touch()
    trained = [" ".join(line.split()) for line in plan().stdout.replace("\\\n", " ").splitlines()
               if "train_codebook.py" in line]
    assert len(trained) == 1 and f"--config-path {child}/codebook_l2.json" in trained[0]
    (configs / "test16" / "codebook_l1.json").touch()
    trained = [line for line in plan().stdout.replace("\\\n", " ").splitlines() if "train_codebook.py" in line]
    assert any(f"--config-path {configs}/test16/codebook_l1.json" in line for line in trained)


def planned_commands(*settings: str) -> list[str]:
    """The python command lines of make -n with these settings (the shipped presets)."""
    venv = Path(sys.executable).parent.parent
    command = ["make", "-n", "-o", f"{venv}/.installed", f"VENV={venv}", *settings]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=script_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.replace("\\\n", " ").splitlines() if "python" in line]


def test_the_tiny32_preset_decodes_with_a_decoder_fine_tuned_on_the_finest_codebook(tmp_path):
    """tiny32 has a decoder.json and DECODER_STEPS: the decoder is fine-tuned (adversarially) after the finest
    pruning and generation takes it; tiny64 has no DECODER_STEPS and
    decodes with the autoencoder; a run tuned from an INIT without a decoder takes INIT's autoencoder."""
    runs = tmp_path / "runs"
    planned = planned_commands("demo", f"RUNS={runs}")
    decoder = next(line for line in planned if "--decode-codebook" in line)
    assert f"--decode-codebook {runs}/pruned/l2/codebook.safetensors" in decoder
    assert "--config-path configs/tiny32/decoder.json" in decoder and "--max-steps 1000" in decoder
    assert json.loads((ROOT / "configs" / "tiny32" / "decoder.json").read_text())["disc_weight"] > 0
    prune_l2 = next(line for line in planned if f"--out-dir {runs}/pruned/l2" in line)
    assert planned.index(prune_l2) < planned.index(decoder)
    generate = next(line for line in planned if "generate_images.py" in line and f"--out-dir {runs}/generated " in line)
    assert f"--decoder-path {runs}/decoder/autoencoder.safetensors" in generate
    # compression's reconstruction fine-tuning would undo the adversarial loss: the autoencoder is compressed
    compress = next(line for line in planned if "compress.py" in line and f"{runs}/compressed/autoencoder" in line)
    assert f"--model-path {runs}/autoencoder/autoencoder.safetensors" in compress
    assert not any("--decode-codebook" in line for line in planned_commands("demo", f"RUNS={runs}", "SIZE=64"))
    init = tmp_path / "init"
    stamp_trained_chain(init)
    for decoder in ("autoencoder", "decoder"):
        tuned = planned_commands("demo", f"RUNS={tmp_path / 'tuned'}", f"INIT={init}")
        generate = next(line for line in tuned if "generate_images.py" in line)
        assert f"--decoder-path {init}/{decoder}/autoencoder.safetensors" in generate
        assert not any("--decode-codebook" in line for line in tuned)
        (init / "decoder").mkdir(exist_ok=True)
        (init / "decoder" / "DONE").touch()
