import json
import struct

import pytest
import torch

from core.artifacts import FORMAT_VERSION, load_artifact, load_state, read_metadata, save_artifact
from core.errors import PipelineError


def make(path, kind="autoencoder"):
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.int8)}
    save_artifact(path, tensors, kind, {"a": 1}, {"stage": "test", "inputs": []}, {"note": "x"})
    return tensors


def test_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = make(path)
    art = load_artifact(path, "autoencoder")
    assert art.kind == "autoencoder" and art.version == FORMAT_VERSION
    assert art.config == {"a": 1} and art.provenance["stage"] == "test" and art.extra == {"note": "x"}
    assert set(art.tensors) == set(tensors)
    for name in tensors:
        assert torch.equal(art.tensors[name], tensors[name])
    assert not list(tmp_path.glob(".*tmp")), "no temporary file is left behind"


def test_wrong_kind_names_both(tmp_path):
    path = tmp_path / "m.safetensors"
    make(path, kind="codebook")
    with pytest.raises(PipelineError, match=r"expected a autoencoder artifact, found kind 'codebook'"):
        load_artifact(path, "autoencoder")


def test_tampered_header(tmp_path):
    path = tmp_path / "m.safetensors"
    make(path)
    raw = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    raw[8 + size // 2] = ord("}")  # break the JSON header
    path.write_bytes(bytes(raw))
    with pytest.raises(PipelineError, match="not a readable safetensors artifact") as info:
        load_artifact(path)
    assert "\n" not in str(info.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "m.safetensors"
    make(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PipelineError, match="not a readable safetensors artifact"):
        load_artifact(path)


def test_unknown_format_version(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={"kind": "autoencoder", "format_version": "99"})
    with pytest.raises(PipelineError, match="unsupported format version '99'"):
        load_artifact(path, "autoencoder")


def test_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="no such file"):
        read_metadata(tmp_path / "nope.safetensors")


def test_shape_mismatch_names_expected_and_found(tmp_path):
    path = tmp_path / "m.safetensors"
    save_artifact(path, {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}, "x", {}, {})
    model = torch.nn.Linear(5, 4)
    with pytest.raises(PipelineError, match=r"'weight' has shape \(4, 3\), the model expects \(4, 5\)"):
        load_state(model, load_artifact(path).tensors, path)


def test_metadata_is_plain_json(tmp_path):
    path = tmp_path / "m.safetensors"
    make(path)
    meta = read_metadata(path)
    assert json.loads(meta["config"]) == {"a": 1}


def test_written_files_get_the_usual_mode(tmp_path):
    import os
    path = tmp_path / "m.safetensors"
    make(path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_the_same_artifact_has_the_same_bytes(tmp_path):
    """safetensors orders metadata keys at random; saved artifacts must not, so that a sha256 names content."""
    contents = set()
    for i in range(6):
        make(tmp_path / f"m{i}.safetensors")
        contents.add((tmp_path / f"m{i}.safetensors").read_bytes())
    assert len(contents) == 1
    assert load_artifact(tmp_path / "m0.safetensors").config == {"a": 1}
