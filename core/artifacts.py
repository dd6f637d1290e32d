"""Safetensors artifacts with JSON metadata, written atomically. Nothing here ever unpickles."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from core.codec import decode_tensors, int8_weights
from core.errors import PipelineError
from core.models.quantized import use_int8_weights

FORMAT_VERSION = 1


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict:
    """How provenance names an input: its path and the sha256 of its bytes."""
    return {"path": str(path), "sha256": sha256_file(path)}


@dataclass
class Artifact:
    path: Path
    kind: str
    version: int
    config: dict
    provenance: dict
    tensors: dict[str, torch.Tensor]
    extra: dict  # any further metadata a stage stored (JSON-decoded)


def save_artifact(path: str | Path, tensors: dict[str, torch.Tensor], kind: str, config: dict,
                  provenance: dict, extra: dict | None = None) -> None:
    metadata = {
        "kind": kind,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config, sort_keys=True),
        "provenance": json.dumps(provenance, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    # clone: safetensors refuses tensors that share storage (views, tied weights)
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write_bytes(path, canonical_header(safetensors_bytes(plain, metadata=metadata)))


def canonical_header(data: bytes) -> bytes:
    """The same safetensors bytes with the metadata keys in sorted order: safetensors writes them in a
    random order, so without this the same artifact would not have the same sha256 twice."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    return data[:8] + text.ljust(length) + data[8 + length:]


def read_metadata(path: str | Path) -> dict:
    """The `__metadata__` of a safetensors file, with one-line errors for every way it can be bad."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a damaged file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PipelineError(f"{path}: not a readable safetensors artifact ({reason})") from None


def read_kind(path: str | Path, kind: str | tuple[str, ...] | None = None) -> str:
    """An artifact's kind, read from its header alone, checked as load_artifact checks it."""
    return _checked_kind(Path(path), read_metadata(path), kind)


def _checked_kind(path: Path, meta: dict, kind: str | tuple[str, ...] | None) -> str:
    found_kind = meta.get("kind", "<none>")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and found_kind not in kinds:
        raise PipelineError(f"{path}: expected a {' or '.join(kinds)} artifact, found kind '{found_kind}'")
    return found_kind


def load_artifact(path: str | Path, kind: str | tuple[str, ...] | None = None, decode: bool = True) -> Artifact:
    """Load an artifact, checking its kind and format version against what the caller expects. A
    compressed artifact's weights are decoded to float unless `decode` is False (then its tensors are
    as stored: see core.codec)."""
    path = Path(path)
    meta = read_metadata(path)
    found_kind = _checked_kind(path, meta, kind)
    try:
        version = int(meta.get("format_version", "-1"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise PipelineError(f"{path}: unsupported format version {meta.get('format_version')!r} "
                            f"(this tool reads version {FORMAT_VERSION})")
    try:
        config = json.loads(meta.get("config", "{}"))
        provenance = json.loads(meta.get("provenance", "{}"))
        extra = json.loads(meta.get("extra", "{}"))
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise PipelineError(f"{path}: damaged artifact ({str(e).splitlines()[0]})") from None
    if decode and "compression" in extra:  # clustered int8 weights (compress.py): decoded to float, so every loader reads them
        tensors = decode_tensors(tensors, extra["compression"], path)
    return Artifact(path, found_kind, version, config, provenance, tensors, extra)


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path,
               prefix: str = "") -> None:
    """Copy `tensors[prefix + name]` into the module, failing in one line on any missing or misshapen one."""
    state = module.state_dict()
    for name, expected in state.items():
        key = prefix + name
        if key not in tensors:
            raise PipelineError(f"{source}: tensor '{key}' is missing (the model expects shape {tuple(expected.shape)})")
        if tuple(tensors[key].shape) != tuple(expected.shape):
            raise PipelineError(f"{source}: tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                                f"the model expects {tuple(expected.shape)}")
    module.load_state_dict({name: tensors[prefix + name] for name in state})


def load_module(path: str | Path, kind: str, build: Callable[[Artifact], torch.nn.Module], int8: bool = False
                ) -> tuple[torch.nn.Module, Artifact]:
    """Load an artifact and the module `build` makes from it, holding its tensors, in eval mode. With
    `int8`, the clustered weights of a compressed artifact stay int8 (core.models.quantized runs them) and
    the artifact's tensors are the module's state."""
    artifact = load_artifact(path, kind, decode=not int8)
    module = build(artifact)
    if int8 and "compression" in artifact.extra:
        rest, weights = int8_weights(artifact.tensors, artifact.extra["compression"], path)
        try:
            use_int8_weights(module, weights)
        except (AttributeError, TypeError) as e:
            raise PipelineError(f"{path}: its compressed weights do not fit the model ({e})") from None
        artifact.tensors = {**rest, **{name: w for name, (w, _) in weights.items()},
                            **{f"{name}_scale": scale.flatten() for name, (_, scale) in weights.items()}}
    load_state(module, artifact.tensors, path)
    module.eval()
    return module, artifact


def state_tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + name: t for name, t in module.state_dict().items()}
