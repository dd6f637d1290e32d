import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script

from core.models.autoencoder import AutoencoderConfig
from core.models.codebook import CodebookConfig
from core.models.transformer import TransformerConfig
from core.config import config_from_dict, load_config, load_config_file
from core.generator import parse_config
from core.stages.compress import CompressConfig
from core.errors import PipelineError
from core.training import claim_out_dir


def test_unknown_key_names_nearest():
    with pytest.raises(PipelineError, match=r"unknown key 'min_chanel' \(did you mean 'min_channel'\?\)"):
        config_from_dict(AutoencoderConfig, {"min_chanel": 8})


def test_out_of_range_and_wrong_type():
    with pytest.raises(PipelineError, match=r"'num_layers' is 12, must be between 0 and 8"):
        config_from_dict(AutoencoderConfig, {"num_layers": 12})
    with pytest.raises(PipelineError, match=r"'image_channel' is 2, expected one of 1, 3"):
        config_from_dict(AutoencoderConfig, {"image_channel": 2})
    with pytest.raises(PipelineError, match=r"'min_channel' must be an integer"):
        config_from_dict(AutoencoderConfig, {"min_channel": "8"})
    with pytest.raises(PipelineError, match=r"min_channel \(64\) is larger than max_channel \(8\)"):
        config_from_dict(AutoencoderConfig, {"min_channel": 64, "max_channel": 8})


def test_seed_keys_are_accepted():
    seed_config = {"model_lr": 1e-5, "image_channel": 3, "min_channel": 256, "max_channel": 512, "num_layers": 2,
                   "latent_channel": 4, "hidden_activation_type": "silu", "use_final_enc_activation": True,
                   "encoder_activation_type": "tanh", "use_final_dec_activation": True,
                   "decoder_activation_type": "tanh"}
    cfg = config_from_dict(AutoencoderConfig, seed_config)
    assert cfg.min_channel == 256 and cfg.image_channel == 3


def test_invalid_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"model_lr": 0.1,}')
    with pytest.raises(PipelineError, match="invalid JSON at line 1"):
        load_config(AutoencoderConfig, path)


def test_out_dir_with_other_config_is_refused(tmp_path):
    out = tmp_path / "run"
    assert claim_out_dir(out, {"a": 1}, resume=False, overwrite=False) == {"a": 1}
    assert claim_out_dir(out, {"a": 1}, resume=False, overwrite=False) == {"a": 1}  # same config: continue
    with pytest.raises(PipelineError, match=r"holds a run with another config \(a: 1 -> 2\)"):
        claim_out_dir(out, {"a": 2}, resume=False, overwrite=False)
    assert claim_out_dir(out, {"a": 2}, resume=True, overwrite=False) == {"a": 1}  # its saved config
    assert claim_out_dir(out, {"a": 2}, resume=False, overwrite=True) == {"a": 2}
    assert json.loads((out / "run.json").read_text())["config"] == {"a": 2}


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(PipelineError, match="holds no run to resume"):
        claim_out_dir(tmp_path / "empty", {"a": 1}, resume=True, overwrite=False)


def test_every_rank_passes_the_same_barriers(tmp_path, monkeypatch):
    """Under torchrun, rank 1 may look at the out dir after rank 0 has written run.json there; it
    must still wait at the barriers rank 0 waits at, or the run hangs."""
    import torch
    from core import training
    barriers = []
    monkeypatch.setattr(training.dist, "barrier", lambda: barriers.append(1))
    out = tmp_path / "run"
    rank0 = training.RunEnv(torch.device("cpu"), rank=0, world_size=2)
    rank1 = training.RunEnv(torch.device("cpu"), rank=1, world_size=2)
    claim_out_dir(out, {"a": 1}, resume=False, overwrite=False, env=rank0)  # fresh dir: rank 0 writes
    on_rank0 = len(barriers)
    claim_out_dir(out, {"a": 1}, resume=False, overwrite=False, env=rank1)  # rank 1 sees it written
    assert on_rank0 == 2 and len(barriers) - on_rank0 == on_rank0


@pytest.mark.parametrize("script,args", [
    ("build_dataset.py", ["--source", "x"]),
    ("train_autoencoder.py", ["--dataset-path", "x"]),
    ("generate_fmap_dataset.py", ["--dataset-path", "x", "--model-path", "x"]),
    ("train_codebook.py", ["--dataset-path", "x"]),
    ("prune_codebook.py", ["--dataset-path", "x", "--codebook-path", "x"]),
    ("train_transformer.py", ["--dataset-path", "x", "--lr-codebook-path", "x", "--hr-codebook-path", "x"]),
    ("generate_images.py", ["--config-path", "x", "--decoder-path", "x"]),
    ("compress.py", ["--model-path", "x", "--dataset-path", "x"]),
])
def test_an_out_dir_that_is_a_file_gets_one_line(tmp_path, script, args):
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    result = run_script(script, *args, "--out-dir", taken)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --out-dir {taken} is a file, not a folder"]
    assert taken.read_text() == "keep me"


def test_a_refusal_names_the_nested_keys_that_differ(tmp_path):
    saved = {"transformer": {"sliding_window": 256, "in_dim": 512}, "shape": {"hr_len": 16}}
    claim_out_dir(tmp_path, saved, resume=False, overwrite=False)
    changed = {"transformer": {"sliding_window": 16, "in_dim": 512}, "shape": {"hr_len": 16}}
    with pytest.raises(PipelineError) as refused:
        claim_out_dir(tmp_path, changed, resume=False, overwrite=False)
    message = str(refused.value).replace(str(tmp_path), "")
    assert "(transformer.sliding_window: 256 -> 16)" in message and len(message) < 200


def test_a_threshold_that_keeps_nothing_names_one_that_keeps_90_percent():
    from core.models.codebook import CodebookConfig, SOMCodebook
    from core.stages.prune import prune
    codebook = SOMCodebook(CodebookConfig(image_H=2, image_W=2, image_C=1, patch_H=2, patch_W=2, num_embeddings=6))
    counts = torch.tensor([50, 30, 10, 5, 3, 2])  # units 0-2 serve 90 of the 100 patches
    with pytest.raises(PipelineError, match="--prune-threshold 10 would keep 3 units, which serve 90% of the 100"):
        prune(codebook, counts, 1000)
    assert prune(codebook, counts, 10)[0].cfg.num_embeddings == 3


def test_a_config_file_holds_only_what_differs_from_its_base(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "autoencoder.json").write_text(json.dumps({"min_channel": 8, "max_channel": 32}))
    (tmp_path / "b.json").write_text(json.dumps({"base": "a/autoencoder.json", "max_channel": 64}))
    (tmp_path / "c.json").write_text(json.dumps({"base": "b.json", "num_layers": 1}))
    cfg = load_config(AutoencoderConfig, tmp_path / "c.json")
    assert (cfg.min_channel, cfg.max_channel, cfg.num_layers) == (8, 64, 1)


def test_a_generation_config_overrides_one_setting_of_one_level(tmp_path):
    levels = {str(i): {"model_path": f"m{i}", "lr_codebook_path": "c", "hr_codebook_path": "f", "top_p": 1.0}
              for i in range(2)}
    (tmp_path / "generate.json").write_text(json.dumps(levels))
    (tmp_path / "child.json").write_text(json.dumps({"base": "generate.json", "1": {"top_p": 0.9}}))
    assert load_config_file(tmp_path / "child.json") == {**levels, "1": {**levels["1"], "top_p": 0.9}}


@pytest.mark.parametrize("files, message", [
    ({"c.json": {"base": "gone.json"}}, r"c\.json: its \"base\" .*gone\.json is not a file"),
    ({"c.json": {"base": "d.json"}, "d.json": {"base": "c.json"}}, r"d\.json: its \"base\" c\.json leads back"),
    ({"c.json": {"base": 3}}, r"c\.json: \"base\" must name another config file"),
])
def test_a_bad_base_is_refused_in_one_line(tmp_path, files, message):
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(PipelineError, match=message):
        load_config(AutoencoderConfig, tmp_path / "c.json")


def preset_chain(preset: Path) -> list[Path]:
    """A preset's folder and its bases' folders, nearest first, as the Makefile walks them."""
    chain = [preset]
    while (chain[-1] / "base").is_file():
        chain.append(chain[-1].parent / (chain[-1] / "base").read_text().strip())
    return chain


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").iterdir()))
def test_every_preset_resolves_into_valid_configs(preset):
    chain = preset_chain(ROOT / "configs" / preset)
    names = {p.name for folder in chain for p in folder.glob("*.json")}
    kinds = {"autoencoder": AutoencoderConfig, "decoder": AutoencoderConfig, "codebook": CodebookConfig,
             "transformer": TransformerConfig, "compress": CompressConfig}
    for name in names:
        path = next(folder / name for folder in chain if (folder / name).is_file())
        kind = next((cls for prefix, cls in kinds.items() if name.startswith(prefix)), None)
        if kind is not None:
            load_config(kind, path)
        else:
            assert len(parse_config(path)) == sum(n.startswith("codebook_") for n in names) - 1


def test_no_config_file_is_repeated_across_presets():
    texts = {}
    for path in sorted((ROOT / "configs").glob("*/*.json")):
        texts.setdefault(json.dumps(json.loads(path.read_text()), sort_keys=True), []).append(path.relative_to(ROOT))
    assert [paths for paths in texts.values() if len(paths) > 1] == []
