"""The export bundle: the runner imports no torch, gives the tokens of torch generation for greedy decoding
and for the same random numbers (plain, compressed, guided, rank and beam search), images within one grey
level, the generation config's settings, dataset.json with provenance, and one-line failures for a
tampered or missing part."""
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.numpy import save as safetensors_bytes

from conftest import ROOT, run_script, script_env
from core.codec import encode_bundle_weights
from core.data import to_uint8
from core.models.sampling import generate_tokens
from core.stages.compress import CompressArgs, run as compress
from core.stages.export import ExportArgs, export_level, run as export
from core.generator import load_levels, parse_config
from core.model_artifacts import load_autoencoder
from conftest import options

spec = importlib.util.spec_from_file_location("bundle_runner", ROOT / "runner" / "runner.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)


class ReplaySource:
    """The runner's random source, replaying what torch.rand(1, generator=g) gives each image's generator."""

    def __init__(self, seeds: list[int], count: int = 400):
        self.streams = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            self.streams.append(iter([torch.rand(1, generator=g).item() for _ in range(count)]))

    def uniform(self, rows):
        return np.array([next(self.streams[r]) for r in rows], dtype=np.float32)


@pytest.fixture(scope="module")
def bundles(models, tmp_path_factory):
    """Bundles of the test pipeline's generator: float32, and compressed (clustered to 8 int8 values,
    without fine-tuning, which is not what is tested here)."""
    root = tmp_path_factory.mktemp("export")
    config = root / "compress.json"
    config.write_text(json.dumps({"clusters": 8, "cluster_steps": 0, "quant_steps": 0}))
    compressed = {}
    for name, data in (("base", "fmaps"), ("cascade", "fmaps"), ("autoencoder", "dataset")):
        compressed[name] = compress(CompressArgs(model_path=models[name], dataset_path=models[data], config_path=config,
                                                 options=options(root / name, batch_size=8)))["artifact"]
    levels = json.loads(models["generate_config"].read_text())
    levels["0"]["model_path"], levels["1"]["model_path"] = compressed["base"], compressed["cascade"]
    generate_compressed = root / "generate_compressed.json"
    generate_compressed.write_text(json.dumps(levels))
    made = {}
    for kind, generate_config, decoder in (("fp32", models["generate_config"], models["autoencoder"]),
                                           ("compressed", generate_compressed, compressed["autoencoder"])):
        export(ExportArgs(config_path=generate_config, decoder_path=decoder, out_dir=root / kind))
        made[kind] = {"bundle": root / kind, "config": generate_config, "decoder": decoder}
    return made


def torch_levels(bundle):
    return load_levels(parse_config(bundle["config"]), bundle["config"])


def conditions(levels, batch=6):
    """Fixed labels and condition tokens for a batch."""
    shape = levels[0].model.shape
    labels = torch.arange(batch) % shape.num_labels
    return labels, (torch.arange(batch) * 3 % shape.coarse_vocab)[:, None]


def settings_of(level, **changes):
    return {key: getattr(replace(level.settings, **changes), key) for key in runner.SETTINGS}


@pytest.mark.parametrize("kind", ["fp32", "compressed"])
@pytest.mark.parametrize("changes", [
    {"temperature": 0.0},  # greedy
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    {"temperature": 0.9, "top_k": 6, "top_p": 0.9},
    {"temperature": 1.0, "guidance_scale": 2.0},
    {"temperature": 1.0, "search": "rank", "num_beam": 3, "beam_width": 4},
    {"search": "beam", "beam_width": 3},
])
def test_runner_gives_the_tokens_of_torch_generation(bundles, kind, changes):
    bundle = bundles[kind]
    levels = torch_levels(bundle)
    generator = runner.Generator(bundle["bundle"], threads=1)
    labels, tokens = conditions(levels)
    mine = tokens.numpy()
    seeds = [100 + i for i in range(len(labels))]
    source = ReplaySource(seeds)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    for level, mine_level in zip(levels, generator.levels):
        settings = replace(level.settings, **changes)
        tokens = generate_tokens(level.model, labels, tokens, settings, generators)
        mine = runner.generate_tokens(mine_level, labels.numpy(), mine, settings_of(level, **changes), source)
        assert np.array_equal(mine, tokens.numpy()), f"level {level.model.shape.kind}"


def runner_level(index, level):
    """The runner's Level of a torch level, built in memory (graphs and weights as export makes them)."""
    info, weights, graphs = export_level(index, level)
    sessions = {}
    for role, graph in info["graphs"].items():
        session_options = ort.SessionOptions()
        session_options.add_external_initializers(graph["weights"], [ort.OrtValue.ortvalue_from_numpy(weights[n])
                                                                     for n in graph["weights"]])
        sessions[role] = ort.InferenceSession(graphs[graph["file"]].SerializeToString(), session_options,
                                              providers=["CPUExecutionProvider"])
    return runner.Level(info, weights, sessions)


@pytest.mark.parametrize("kind", ["fp32", "compressed"])
def test_runner_reads_long_sequences_in_the_windows_of_torch(bundles, kind):
    """Sliding windows: at each window's start the cache is refilled (base: with its prefix) as in torch."""
    levels = torch_levels(bundles[kind])
    for level, window in zip(levels, (2, 6)):
        level.model.cfg.use_sliding_window, level.model.cfg.sliding_window = True, window
    labels, tokens = conditions(levels)
    mine = tokens.numpy()
    seeds = [7 + i for i in range(len(labels))]
    source, generators = ReplaySource(seeds), [torch.Generator().manual_seed(s) for s in seeds]
    for index, level in enumerate(levels):
        mine_level = runner_level(index, level)
        assert mine_level.info["window"] < mine_level.info["fine_len"]
        tokens = generate_tokens(level.model, labels, tokens, level.settings, generators)
        mine = runner.generate_tokens(mine_level, labels.numpy(), mine, settings_of(level), source)
        assert np.array_equal(mine, tokens.numpy())


@pytest.mark.parametrize("kind", ["fp32", "compressed"])
def test_runner_generates_as_torch_from_a_model_with_the_augmentation_condition(bundles, kind):
    """The bundle holds the label rows with the condition's 'original' row folded in, as sampling uses them."""
    levels = torch_levels(bundles[kind])
    for level in levels:
        level.model.augment_emb = torch.nn.Embedding(2, level.model.cfg.in_dim)
        torch.nn.init.normal_(level.model.augment_emb.weight, std=0.5, generator=torch.Generator().manual_seed(2))
    labels, tokens = conditions(levels)
    mine = tokens.numpy()
    seeds = [11 + i for i in range(len(labels))]
    source, generators = ReplaySource(seeds), [torch.Generator().manual_seed(s) for s in seeds]
    for index, level in enumerate(levels):
        tokens = generate_tokens(level.model, labels, tokens, level.settings, generators)
        mine = runner.generate_tokens(runner_level(index, level), labels.numpy(), mine, settings_of(level), source)
        assert np.array_equal(mine, tokens.numpy())


@pytest.mark.parametrize("kind", ["fp32", "compressed"])
def test_runner_images_match_torch_within_one_grey_level(bundles, kind):
    bundle = bundles[kind]
    levels = torch_levels(bundle)
    decoder, _ = load_autoencoder(bundle["decoder"])
    tokens = torch.randint(0, levels[-1].fine_book.cfg.num_embeddings, (5, levels[-1].model.shape.fine_len),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = to_uint8(decoder.decoder(levels[-1].fine_book.lookup(tokens)).clamp(-1, 1)).numpy()
    images = runner.Generator(bundle["bundle"], threads=1).images(tokens.numpy())
    assert images.shape == expected.shape and images.dtype == np.uint8
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_bundle_weights_round_trip_through_the_runner():
    rng = np.random.default_rng(0)
    levels = np.array([-127, -40, -3, 0, 5, 33, 90, 127], dtype=np.int8)
    weights = {"few": rng.choice(levels[:3], (64, 48), p=[0.7, 0.2, 0.1]).astype(np.int8),  # 2 bits: packed
               "many": rng.choice(levels, (300, 40)).astype(np.int8),
               "exact": rng.standard_normal((5, 3)).astype(np.float16).astype(np.float32),
               "wide": np.array([1e-8, 3.3, 70000.0], dtype=np.float32)}
    stored, specs = encode_bundle_weights(weights)
    assert stored["exact"].dtype == np.float16 and stored["wide"].dtype == np.float32
    assert "bits" in specs["few"] and len(stored["few.indices"]) < weights["few"].size * 2 / 8
    decoded = runner.decode_weights(runner.read_safetensors(safetensors_bytes(stored)), specs)
    for name, array in weights.items():
        assert decoded[name].dtype == array.dtype and np.array_equal(decoded[name], array)


def test_compressed_bundle_keeps_int8_weights_and_is_smaller(bundles):
    manifests = {kind: json.loads((b["bundle"] / "bundle.json").read_text()) for kind, b in bundles.items()}
    int8 = [name for name, spec in manifests["compressed"]["weights"].items() if spec["dtype"] == "int8"]
    assert int8 and all(spec["dtype"] == "float32" for spec in manifests["fp32"]["weights"].values())
    stored = runner.read_safetensors((bundles["compressed"]["bundle"] / "weights.safetensors").read_bytes())
    assert all(len(stored[f"{name}.values"]) <= 8 for name in int8)  # 8 clusters
    sizes = {kind: (b["bundle"] / "weights.safetensors").stat().st_size for kind, b in bundles.items()}
    assert sizes["compressed"] * 4 < sizes["fp32"]


BLOCK_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['PIL'] = None; "
               "sys.argv[0] = {path!r}; sys.path.insert(0, {folder!r}); import runner; sys.exit(runner.main({args!r}))")


def run_runner(bundle, *args):
    """The bundle's own runner.py in a fresh interpreter in which torch and PIL cannot be imported."""
    code = BLOCK_TORCH.format(path=str(bundle / "runner.py"), folder=str(bundle), args=[str(a) for a in args])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=script_env(), cwd=bundle)


def test_runner_runs_without_torch_and_writes_a_dataset(bundles, tmp_path, models):
    bundle = bundles["compressed"]["bundle"]
    out = tmp_path / "generated"
    result = run_runner(bundle, "--out-dir", out, "--num-images", 5, "--batch-size", 2, "--seed", 3, "--threads", 1)
    assert result.returncode == 0, result.stderr
    db = json.loads((out / "dataset.json").read_text())
    records = [db["_default"][str(i + 1)] for i in range(5)]
    manifest = json.loads((bundle / "bundle.json").read_text())
    names = manifest["levels"][0]["label_names"]
    for index, record in enumerate(records):
        with Image.open(out / record["image_fpath"]) as image:
            assert image.size == (16, 16) and image.mode == "L"
        assert record["index"] == index and record["run"] == 1 and record["image_fpath"].startswith("images/000/")
        assert all(label in names for label in record["labels"])
    provenance = db["runs"]["1"]
    assert provenance["seed"] == 3 and provenance["num_images"] == 5
    assert provenance["levels"][0]["model"] == manifest["provenance"]["levels"][0]["model"]
    assert provenance["levels"][1]["top_k"] == 8 and provenance["export"]["runtime"].startswith("onnxruntime")
    assert db["info"]["1"] == {"kind": "generated", "channels": 1, "size": 16, "images": 5}
    assert (out / "grid.png").exists()
    # the output folder is a dataset the stages read; the same seed gives the same images in other batches
    again = run_runner(bundle, "--out-dir", tmp_path / "again", "--num-images", 5, "--batch-size", 5, "--seed", 3,
                       "--threads", 1)
    assert again.returncode == 0, again.stderr
    for record in records:
        assert (out / record["image_fpath"]).read_bytes() == (tmp_path / "again" / record["image_fpath"]).read_bytes()


def test_runner_reads_a_generation_config(bundles, tmp_path):
    bundle = bundles["fp32"]["bundle"]
    config = json.loads(bundles["fp32"]["config"].read_text())
    config["0"]["label"] = "square"
    config["1"]["temperature"] = 0.0
    path = tmp_path / "generate.json"
    path.write_text(json.dumps(config))
    result = run_runner(bundle, "--out-dir", tmp_path / "out", "--num-images", 3, "--config-path", path)
    assert result.returncode == 0, result.stderr
    db = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert all(r["labels"] == ["square"] for r in db["_default"].values())
    assert db["runs"]["1"]["levels"][1]["temperature"] == 0.0
    config["0"]["label"] = "hexagon"
    path.write_text(json.dumps(config))
    result = run_runner(bundle, "--out-dir", tmp_path / "bad", "--num-images", 1, "--config-path", path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert 'unknown label "hexagon"' in result.stderr


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "level1.step.onnx").write_bytes((b / "level1.step.onnx").read_bytes()[:-1] + b"\x00"),
     "level1.step.onnx does not match the sha256"),
    (lambda b: (b / "weights.safetensors").unlink(), "weights.safetensors is missing"),
    (lambda b: (b / "bundle.json").unlink(), "bundle.json is missing"),
])
def test_a_tampered_or_missing_part_fails_in_one_line(bundles, tmp_path, damage, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["fp32"]["bundle"], bundle)
    damage(bundle)
    result = run_runner(bundle, "--out-dir", tmp_path / "out", "--num-images", 1)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_folder_that_holds_something_else(bundles, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    bundle = bundles["fp32"]
    result = run_script("export.py", "--config-path", bundle["config"], "--decoder-path", bundle["decoder"],
                        "--out-dir", out, "--overwrite")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "holds no bundle" in result.stderr and (out / "notes.txt").read_text() == "mine"
