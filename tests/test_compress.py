"""Compression: clustering keeps N shared values, int8 codes, the artifact's round trip, every stage
reading compressed models (generation end to end), one-line errors, and Ctrl-C / resume."""
import json
import zlib

import numpy as np

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from conftest import interrupt_paused, options, run_script, start_script, wait_paused
from core.artifacts import load_artifact
from core.codec import pack_bits, unpack_bits
from core.model_artifacts import load_model
from core.models.quantized import (Int8Conv2d, Int8Embedding, Int8Linear, fake_quantize, int8_module, quantize_int8,
                                   set_quantize, share_weights)
from core.stages.compress import CompressArgs, CompressConfig, run


def compress(model_path, config_path, out_dir, dataset_path, batch_size):
    """The compress stage in-process, on the CPU."""
    return run(CompressArgs(model_path=model_path, dataset_path=dataset_path, config_path=config_path,
                            options=options(out_dir, batch_size=batch_size, checkpoint_step=100)))

FEW_STEPS = {"clusters": 16, "cluster_steps": 4, "quant_steps": 4, "cluster_lr": 1e-3, "quant_lr": 1e-3}


def write_config(path, **settings):
    path.write_text(json.dumps(settings))
    return path


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("per_channel", [False, True])
def test_clustered_tensors_keep_at_most_n_values_through_fine_tuning(per_channel):
    model = small_model()
    cfg = CompressConfig(clusters=4, per_channel=per_channel)
    shared = share_weights(model, ["0.weight", "2.weight"], clusters=cfg.clusters, per_channel=cfg.per_channel,
                           init=cfg.init, iters=cfg.kmeans_iters, seed=0)

    def distinct_per_row(weight):
        rows = weight.detach().reshape(len(weight), -1) if per_channel else weight.detach().reshape(1, -1)
        return max(len(torch.unique(row)) for row in rows)

    assert distinct_per_row(model[0].weight) <= 4 and distinct_per_row(model[2].weight) <= 4
    start = shared["0.weight"].centroids.detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    for quantize in (False, True):
        set_quantize(shared, quantize)
        for _ in range(5):
            loss = (model(x) - y).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert distinct_per_row(model[0].weight) <= 4 and distinct_per_row(model[2].weight) <= 4
    assert not torch.equal(start, shared["0.weight"].centroids)  # the centroids trained
    assert model[0].parametrizations.weight.original.grad is None  # the assignments did not


def test_int8_centroids_reconstruct_within_their_scale():
    centroids = torch.randn(16) * 0.05
    codes, scale = quantize_int8(centroids)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    assert ((codes.float() * scale - centroids).abs() <= scale / 2 + 1e-9).all()
    c = centroids.clone().requires_grad_(True)
    out = fake_quantize(c)
    assert torch.allclose(out, codes.float() * scale)
    out.sum().backward()
    assert torch.equal(c.grad, torch.ones(16))  # straight through


def int8_rows(weight):
    """A float weight as int8 with a scale per output row: its quantization and the error bound of each row."""
    scale = weight.detach().reshape(len(weight), -1).abs().amax(1) / 127
    codes = torch.round(weight.detach() / scale.view(-1, *[1] * (weight.dim() - 1))).to(torch.int8)
    return codes, scale


@pytest.mark.parametrize("module", [nn.Linear(48, 24), nn.Linear(48, 24, bias=False), nn.Embedding(30, 16),
                                    nn.Conv2d(3, 8, 3, padding=1)], ids=["linear", "linear-no-bias", "embedding", "conv"])
def test_int8_layer_matches_its_float_counterpart_within_its_quantization_error(module):
    torch.manual_seed(0)
    codes, scale = int8_rows(module.weight)
    quantized = int8_module(module, codes, scale)
    assert isinstance(quantized, (Int8Linear, Int8Embedding, Int8Conv2d)) and quantized.weight.dtype == torch.int8
    x = {nn.Linear: torch.randn(7, 48), nn.Embedding: torch.randint(0, 30, (4, 5)),
         nn.Conv2d: torch.randn(2, 3, 6, 6)}[type(module)]
    with torch.no_grad():
        expected, got = module(x), quantized(x)
        # each weight is off by at most half its row's scale: the output by at most that times sum |input|
        if isinstance(module, nn.Embedding):
            bound = (scale[x] / 2)[..., None].expand_as(got)
        elif isinstance(module, nn.Linear):
            bound = x.abs().sum(1, keepdim=True) * scale / 2
        else:
            windows = nn.functional.conv2d(x.abs(), torch.ones(1, 3, 3, 3), padding=1)
            bound = windows * (scale / 2).view(1, -1, 1, 1)
    error = (got - expected).abs()
    assert (error <= bound + 1e-5).all() and error.max() > 0
    assert quantized.weight.nbytes * 4 == module.weight.nbytes  # a quarter of the float weight


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_bit_packing_round_trip(bits):
    indices = torch.randint(0, 2 ** bits, (1001,))
    packed = pack_bits(indices, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 1001), indices)


def test_compressed_artifact_round_trip(tmp_path, pipeline):
    config = write_config(tmp_path / "c.json", **FEW_STEPS, per_channel=True)
    out = tmp_path / "ae"
    report = compress(pipeline["autoencoder"], config, out, pipeline["dataset"], batch_size=8)
    path = out / "autoencoder.safetensors"
    artifact = load_artifact(path, "autoencoder")
    info = artifact.extra["compression"]
    assert artifact.provenance["stage"] == "compress" and info["bits"] == 4 and info["tensors"]
    with safe_open(str(path), framework="pt") as f:
        raw = {name: f.get_tensor(name) for name in f.keys()}
    original = load_artifact(pipeline["autoencoder"]).tensors
    assert set(artifact.tensors) == set(original)
    for name, shape in info["tensors"].items():
        assert name not in raw and raw[f"{name}.centroids"].dtype == torch.int8
        packed = np.frombuffer(zlib.decompress(raw[f"{name}.indices"].numpy().tobytes()), dtype=np.uint8)
        indices = unpack_bits(torch.from_numpy(packed.copy()), 4, int(np.prod(shape))).view(shape)
        scale = raw[f"{name}.scale"].view(-1, *[1] * (len(shape) - 1))
        decoded = artifact.tensors[name]
        assert decoded.dtype == torch.float32 and indices.max() < 16
        assert torch.equal(decoded, raw[f"{name}.centroids"].float()[indices] * scale)
        assert max(len(torch.unique(row)) for row in decoded.reshape(shape[0], -1)) <= 16
    saved = json.loads((out / "report.json").read_text())
    assert saved["size_bytes"]["after"] == path.stat().st_size < saved["size_bytes"]["before"]
    assert saved["ratio"] == report["ratio"] and set(saved["quality"]) == {"before", "clustered_no_finetune", "after"}


def test_compressed_models_run_with_int8_weights_and_give_the_decoded_outputs(tmp_path, models):
    config = write_config(tmp_path / "c.json", clusters=16, cluster_steps=0, quant_steps=0)
    report = compress(models["cascade"], config, tmp_path / "cascade", models["fmaps"], batch_size=8)
    int8_model, _ = load_model(report["artifact"])
    float_model, _ = load_model(report["artifact"], int8=False)
    int8_bytes = sum(t.numel() * t.element_size() for t in int8_model.state_dict().values())
    float_bytes = sum(t.numel() * t.element_size() for t in float_model.state_dict().values())
    assert isinstance(int8_model.head, Int8Linear) and isinstance(int8_model.tok_emb, Int8Embedding)
    assert int8_bytes < float_bytes / 3
    shape = int8_model.shape
    labels, coarse = torch.tensor([0, 1]), torch.randint(0, shape.coarse_vocab, (2, shape.coarse_len))
    fine = torch.randint(0, shape.fine_vocab, (2, shape.fine_len))
    positions = torch.arange(shape.fine_len).expand(2, -1)
    with torch.no_grad():
        assert torch.equal(int8_model(labels, coarse, fine, positions), float_model(labels, coarse, fine, positions))


def test_generation_runs_from_compressed_models(tmp_path, models):
    config = write_config(tmp_path / "c.json", **FEW_STEPS)
    compressed = {}
    for name, data in (("base", "fmaps"), ("cascade", "fmaps"), ("autoencoder", "dataset")):
        report = compress(models[name], config, tmp_path / name, models[data], batch_size=8)
        compressed[name] = report["artifact"]
        assert report["ratio"] > 1 and report["kind"] == ("autoencoder" if name == "autoencoder" else "transformer")
    levels = json.loads(models["generate_config"].read_text())
    levels["0"]["model_path"], levels["1"]["model_path"] = compressed["base"], compressed["cascade"]
    generate_config = write_config(tmp_path / "generate.json", **levels)
    out = tmp_path / "images"
    result = run_script("generate_images.py", "--config-path", generate_config, "--decoder-path",
                        compressed["autoencoder"], "--out-dir", out, "--device", "cpu", "--num-images", 4)
    assert result.returncode == 0, result.stderr
    assert len(list((out / "images").glob("*/*.png"))) == 4
    raw = json.loads((out / "dataset.json").read_text())
    assert raw["runs"][str(raw["_default"]["1"]["run"])]["levels"][0]["model"]["path"] == compressed["base"]


@pytest.mark.parametrize("settings, message", [
    ({"clusters": 300}, "'clusters' is 300, must be between 2 and 256"),
    ({"include": ["*attn*"]}, "include pattern '*attn*' matches no layer"),
    ({"cluster": 16}, "unknown key 'cluster' (did you mean 'clusters'?)"),
])
def test_bad_config_gives_one_line_and_writes_nothing(tmp_path, pipeline, settings, message):
    config = write_config(tmp_path / "bad.json", **settings)
    out = tmp_path / "out"
    result = run_script("compress.py", "--model-path", pipeline["autoencoder"], "--dataset-path", pipeline["dataset"],
                        "--config-path", config, "--out-dir", out, "--device", "cpu")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_the_run_resumes(tmp_path, pipeline):
    config = write_config(tmp_path / "c.json", **{**FEW_STEPS, "cluster_steps": 800, "quant_steps": 2})
    out = tmp_path / "out"
    args = ("--model-path", pipeline["autoencoder"], "--dataset-path", pipeline["dataset"], "--config-path", config,
            "--out-dir", out, "--device", "cpu", "--batch-size", "8", "--checkpoint-step", "1000000")
    proc = start_script("compress.py", *args, pause_at=10)  # the clustering stage's 10th step
    wait_paused(proc)
    _, stderr = interrupt_paused(proc)
    assert proc.returncode == 130, stderr
    step = load_artifact(out / "cluster" / "checkpoint.safetensors", "checkpoint").extra["step"]
    assert step == 10 and not (out / "autoencoder.safetensors").exists()
    result = run_script("compress.py", *args)
    assert result.returncode == 0, result.stderr
    assert load_artifact(out / "autoencoder.safetensors", "autoencoder").provenance["step"] == 802
