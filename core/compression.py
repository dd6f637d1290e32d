"""Weight compression (seed 000): the values of each chosen weight tensor are grouped into N clusters
that share their centroid, and the model is fine-tuned with the sharing kept; then the centroids are
quantized to int8 and the model fine-tuned again with the quantization in the loop.

The artifact keeps the source model's kind and config. For each clustered tensor `name` it stores
`name.indices` (cluster indices packed to the bits N needs, then deflated unless entropy_coding is
off), `name.centroids` (int8, N) and `name.scale` (float, one per tensor or per output channel): the
weight is centroids[indices] * scale. The other tensors are kept (as float16 with float16_rest). Its
extra["compression"] describes this, and load_artifact decodes it back to ordinary float tensors, so
every stage reads a compressed model unchanged."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from core.config import load_config, option, to_dict
from core.errors import PipelineError

# core.artifacts decodes compressed artifacts with this module, so this module imports it (and the
# stages, which import it) only inside the functions that run the stage
if TYPE_CHECKING:
    from core.artifacts import Artifact
    from core.training import Objective

FORMAT = 1
KINDS = ("autoencoder", "transformer")


@dataclass
class CompressConfig:
    """Defaults: the tiny preset's transformers (configs/compress_tiny_*.json hold both stages' settings)."""
    clusters: int = option(16, low=2, high=256, doc="shared values per clustered tensor")
    include: list[str] = option(["*"], doc="fnmatch patterns of the tensors to cluster; each must match one")
    exclude: list[str] = option(["*bias", "*ln*", "*norm*"], doc="patterns of tensors left as they are")
    per_channel: bool = option(False, doc="a float scale per output channel, besides the shared centroids")
    init: str = option("linear", choices=("linear", "kmeans++"), doc="k-means initialisation (data-independent)")
    kmeans_iters: int = option(30, low=0, high=1000)
    cluster_steps: int = option(300, low=0, high=10**7, doc="fine-tuning steps with shared centroids")
    cluster_lr: float = option(1e-3, low=0.0, high=1.0)
    quant_steps: int = option(50, low=0, high=10**7, doc="fine-tuning steps with int8 centroids")
    quant_lr: float = option(2e-4, low=0.0, high=1.0)
    entropy_coding: bool = option(True, doc="deflate the packed indices (zlib, lossless)")
    float16_rest: bool = option(True, doc="store the scales and the tensors left unclustered as float16")


# ---------------------------------------------------------------- clustering

def kmeans_1d(values: torch.Tensor, k: int, init: str = "linear", iters: int = 30,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster scalars into k groups: (centroids (k,), sorted; index of each value's centroid)."""
    values = values.detach().float().flatten().cpu()
    if init == "linear":  # evenly over [min, max]: keeps the rare large weights (Deep Compression)
        centroids = torch.linspace(values.min().item(), values.max().item(), k)
    else:  # k-means++: each next centroid drawn with probability proportional to squared distance
        centroids = values[torch.randint(len(values), (1,), generator=generator)]
        d2 = (values - centroids[0]).pow(2)  # squared distance to the nearest centroid so far
        for _ in range(k - 1):
            weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
            chosen = values[torch.multinomial(weights, 1, generator=generator)]
            centroids = torch.cat([centroids, chosen])
            d2 = torch.minimum(d2, (values - chosen).pow(2))
        centroids = centroids.sort().values
    indices = assign(values, centroids)
    for _ in range(iters):
        sums = torch.zeros(k).index_add_(0, indices, values)
        counts = torch.bincount(indices, minlength=k)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids).sort().values
        new_indices = assign(values, updated)
        centroids, converged = updated, torch.equal(new_indices, indices)
        indices = new_indices
        if converged:
            break
    return centroids, indices


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted centroids, for each value."""
    return torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)


def int8_scale(centroids: torch.Tensor) -> torch.Tensor:
    return centroids.detach().abs().max().clamp_min(1e-12) / 127


def quantize_int8(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and the scale that maps them back: |codes * scale - centroids| <= scale / 2."""
    scale = int8_scale(centroids)
    return torch.round(centroids.detach() / scale).clamp(-127, 127).to(torch.int8), scale


def fake_quantize(centroids: torch.Tensor) -> torch.Tensor:
    """The int8 round trip in the forward pass, the identity in the backward (straight-through)."""
    scale = int8_scale(centroids)
    rounded = torch.round(centroids / scale).clamp(-127, 127) * scale
    return centroids + (rounded - centroids).detach()


def row_shape(weight_shape: torch.Size, per_channel: bool) -> tuple[int, ...]:
    """Shape of a tensor's scale, broadcastable against it: one per output channel (dim 0) or one."""
    if per_channel and len(weight_shape) > 1:
        return (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    return (1,) * max(1, len(weight_shape))


class SharedWeight(nn.Module):
    """A weight computed as row_scale * centroids[indices] (a parametrization: it replaces the module's
    own weight). Only the centroids and row scales train; the assignments stay fixed, so the weight
    keeps at most N distinct values (per output channel with per-channel scales)."""

    def __init__(self, indices: torch.Tensor, centroids: torch.Tensor, row_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("indices", indices.to(torch.uint8))  # at most 256 clusters
        self.centroids = nn.Parameter(centroids.float())
        self.row_scale = nn.Parameter(row_scale.float())
        self.quantize = False  # set for the second phase

    def forward(self, original: torch.Tensor | None = None) -> torch.Tensor:  # the original is not used
        values = fake_quantize(self.centroids) if self.quantize else self.centroids
        return values[self.indices.long()] * self.row_scale

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, int8 centroids, float scale per row) such that the weight is centroids[indices] * scale."""
        q, scale = quantize_int8(self.centroids)
        return self.indices.long().cpu(), q.cpu(), (self.row_scale.detach() * scale).float().flatten().cpu()


def cluster_weight(weight: torch.Tensor, cfg: CompressConfig, generator: torch.Generator) -> SharedWeight:
    weight = weight.detach().float().cpu()
    shape = row_shape(weight.shape, cfg.per_channel)
    row_scale = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True).clamp_min(1e-12) \
        if cfg.per_channel and weight.dim() > 1 else torch.ones(shape)
    centroids, indices = kmeans_1d(weight / row_scale, cfg.clusters, cfg.init, cfg.kmeans_iters, generator)
    return SharedWeight(indices.view(weight.shape), centroids, row_scale.view(shape))


def select_tensors(model: nn.Module, cfg: CompressConfig, source: str | Path) -> list[str]:
    """Names of the parameters to cluster. Every include pattern must match a parameter; exclude
    patterns may match nothing (the defaults name layers that only some models have)."""
    names = [name for name, p in model.named_parameters() if p.is_floating_point()]
    for pattern in cfg.include:
        if not any(fnmatch(name, pattern) for name in names):
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise PipelineError(f"{source}: include pattern '{pattern}' matches no layer (layers: {shown})")
    chosen = [n for n in names if any(fnmatch(n, p) for p in cfg.include) and not any(fnmatch(n, p) for p in cfg.exclude)]
    if not chosen:
        raise PipelineError(f"{source}: no layer to cluster (include: {', '.join(cfg.include) or 'none'}; "
                            f"exclude: {', '.join(cfg.exclude) or 'none'})")
    return chosen


def apply_clustering(model: nn.Module, names: list[str], cfg: CompressConfig, seed: int) -> dict[str, SharedWeight]:
    """Replace each named weight by a SharedWeight clustered from it, in place."""
    generator = torch.Generator().manual_seed(seed)
    shared = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attr)
        shared[name] = cluster_weight(weight, cfg, generator).to(weight.device)
        parametrize.register_parametrization(module, attr, shared[name], unsafe=True)
        getattr(module.parametrizations, attr).original.requires_grad_(False)
    return shared


def set_quantize(shared: dict[str, SharedWeight], on: bool) -> None:
    for weight in shared.values():
        weight.quantize = on


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their ordinary names, leaving out the parametrized ones."""
    return {name: t for name, t in model.state_dict().items() if ".parametrizations." not in name}


# ---------------------------------------------------------------- the artifact's encoding

def pack_bits(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices (< 2**bits) as a stream of `bits`-bit fields, most significant bit first, in uint8."""
    values = indices.flatten().numpy().astype(np.uint16)
    fields = (values[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint16)) & 1
    return torch.from_numpy(np.packbits(fields.astype(np.uint8).reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    fields = np.unpackbits(packed.numpy(), count=count * bits).reshape(count, bits).astype(np.int64)
    return torch.from_numpy(fields @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64)))


def index_bits(clusters: int) -> int:
    return max(1, (clusters - 1).bit_length())


def encode_tensors(tensors: dict[str, torch.Tensor], shared: dict[str, SharedWeight],
                   cfg: CompressConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The artifact's tensors and its extra["compression"] for a model whose `shared` weights were clustered;
    `tensors` holds every other tensor the artifact keeps."""
    bits = index_bits(cfg.clusters)
    out, shapes = {}, {}
    for name, weight in shared.items():
        indices, q, scale = weight.codes()
        packed = pack_bits(indices, bits)
        if cfg.entropy_coding:
            packed = torch.from_numpy(np.frombuffer(zlib.compress(packed.numpy().tobytes(), 9), dtype=np.uint8).copy())
        if cfg.float16_rest:
            scale = scale.half()
        out[f"{name}.indices"], out[f"{name}.centroids"], out[f"{name}.scale"] = packed, q, scale
        shapes[name] = list(indices.shape)
    halved = []
    for name, t in tensors.items():
        if cfg.float16_rest and t.dtype == torch.float32:
            t = t.half()
            halved.append(name)
        out[name] = t
    info = {"format": FORMAT, "clusters": cfg.clusters, "bits": bits,
            "coding": "deflate" if cfg.entropy_coding else "packed", "per_channel": cfg.per_channel,
            "tensors": shapes, "float16": halved}
    return out, info


def decode_tensors(tensors: dict[str, torch.Tensor], info: dict, source: str | Path) -> dict[str, torch.Tensor]:
    """Float tensors of a compressed artifact: each clustered weight rebuilt as centroids[indices] * scale."""
    if info.get("format") != FORMAT:
        raise PipelineError(f"{source}: unsupported compression format {info.get('format')!r} (this tool reads {FORMAT})")
    out = dict(tensors)
    try:
        for name, shape in info["tensors"].items():
            packed = out.pop(f"{name}.indices")
            if info["coding"] == "deflate":
                packed = torch.from_numpy(np.frombuffer(zlib.decompress(packed.numpy().tobytes()), dtype=np.uint8).copy())
            indices = unpack_bits(packed, info["bits"], int(np.prod(shape))).view(shape)
            out[name] = dequantize(indices, out.pop(f"{name}.centroids"), out.pop(f"{name}.scale"))
        for name in info.get("float16", []):
            out[name] = out[name].float()
    except (KeyError, ValueError, RuntimeError, IndexError, zlib.error) as e:
        raise PipelineError(f"{source}: damaged compressed artifact ({type(e).__name__}: {e})") from None
    return out


def dequantize(indices: torch.Tensor, centroids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    values = centroids.float()[indices.long()]
    return values * scale.float().view(-1, *([1] * (values.dim() - 1)))


# ---------------------------------------------------------------- the stage

@dataclass
class Source:
    """The model to compress, with its stage's objective (batch, loss, held-out evaluation)."""
    kind: str
    model: nn.Module
    artifact: Artifact
    task: Objective
    metric: str  # the evaluation's quality figure
    inputs: list[dict]  # provenance: the files it came from


def load_source(model_path: Path, dataset_path: Path, device: torch.device) -> Source:
    from core import autoencoder, cascade
    from core.artifacts import file_record
    model, artifact = load_model(model_path)
    if "compression" in artifact.extra:
        raise PipelineError(f"{model_path} is already compressed; compress the model it was made from")
    kind = artifact.kind
    if kind == "autoencoder":
        data = autoencoder.load_images(dataset_path, model.cfg)
        task = autoencoder.objective(model.cfg, data, device)
        return Source(kind, model, artifact, task, "heldout_psnr", [file_record(model_path), file_record(dataset_path)])
    books = {}
    for key in ("lr_codebook", "hr_codebook"):
        record = artifact.extra.get(key) or {}
        path = Path(record.get("path", ""))
        if not path.is_file():
            raise PipelineError(f"{model_path} was trained with {key} {record.get('path')!r}, which is not a file here")
        if file_record(path)["sha256"] != record.get("sha256"):
            raise PipelineError(f"{model_path}: its {key} {path} has changed since the model was trained")
        books[key] = path
    tokens = cascade.load_token_data(dataset_path, books["lr_codebook"], books["hr_codebook"], model.shape.kind == "base")
    for field in ("kind", "lr_vocab", "hr_vocab", "lr_len", "hr_len", "num_labels"):
        if getattr(tokens.shape, field) != getattr(model.shape, field):
            raise PipelineError(f"{dataset_path} gives {field} {getattr(tokens.shape, field)}, but {model_path} "
                                f"was trained with {getattr(model.shape, field)}")
    task = cascade.objective(model.cfg, model.shape, tokens, device)
    inputs = [file_record(p) for p in (model_path, dataset_path, books["lr_codebook"], books["hr_codebook"])]
    return Source(kind, model, artifact, task, "heldout_loss", inputs)


def load_model(path: Path) -> tuple[nn.Module, Artifact]:
    """An autoencoder or transformer artifact and its model, loaded by its stage's own loader."""
    from core import autoencoder, cascade
    from core.artifacts import read_kind
    if read_kind(path, KINDS) == "autoencoder":
        return autoencoder.load_autoencoder(path)
    return cascade.load_transformer(path)


def evaluate(source: Source, model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        value = source.task.evaluate(model)[source.metric]
    model.train()
    return value


def compress(model_path: Path, config_path: Path | None, out_dir: Path, dataset_path: Path, device: str,
             batch_size: int = 64, seed: int = 0, checkpoint_step: int = 100, resume: bool = False,
             overwrite: bool = False) -> dict:
    """Cluster, fine-tune, quantize and fine-tune again; write the compressed artifact and report.json
    into out_dir, and return the report. Each fine-tuning phase has its own sub-folder and checkpoint."""
    from core.training import Trainer, TrainArgs, claim_out_dir, finish_run, setup_run
    cfg = load_config(CompressConfig, config_path)
    env = setup_run(device, seed)
    source = load_source(model_path, dataset_path, env.device)
    names = select_tensors(source.model, cfg, model_path)
    if source.task.num_items < batch_size:
        raise PipelineError(f"{dataset_path} has {source.task.num_items} training items, fewer than --batch-size {batch_size}")
    run = {"compress": to_dict(cfg), "model": source.inputs[0]["sha256"]}  # inputs[0]: the model's record
    saved = claim_out_dir(out_dir, run, resume, overwrite, env)
    if saved["model"] != run["model"]:
        raise PipelineError(f"--resume: {out_dir} compresses another model than {model_path}")
    cfg = CompressConfig(**saved["compress"])

    model = source.model.to(env.device)
    before = evaluate(source, model)
    shared = apply_clustering(model, names, cfg, seed)
    clustered = evaluate(source, model)
    phases = [("cluster", cfg.cluster_steps, cfg.cluster_lr, False), ("quantize", cfg.quant_steps, cfg.quant_lr, True)]
    for index, (phase, steps, lr, quantize) in enumerate(phases):
        set_quantize(shared, quantize)
        if steps == 0:
            continue
        torch.manual_seed(seed + index)
        args = TrainArgs(out_dir / phase, f"compress_{phase}", batch_size=batch_size, max_epoch=steps,
                         max_steps=steps, checkpoint_step=checkpoint_step, lr=lr, seed=seed,
                         config={"phase": phase, **saved})
        claim_out_dir(args.out_dir, args.config, False, overwrite, env)  # same config as the top: continues
        task = source.task
        Trainer(env, model, task.num_items, task.get_batch, task.loss_fn, args,
                lambda net, step: task.evaluate(net), items_per_batch=task.items_per_batch).fit()

    report = {}
    if env.is_main:
        quality = {"before": before, "clustered_no_finetune": clustered}
        report = write_outputs(model, shared, source, cfg, model_path, out_dir, quality)
    finish_run(env)
    return report


def write_outputs(model: nn.Module, shared: dict[str, SharedWeight], source: Source, cfg: CompressConfig,
                  model_path: Path, out_dir: Path, quality: dict) -> dict:
    """Write the compressed artifact, read it back as the stages do (its quality after), and write report.json."""
    from core.artifacts import atomic_write_json, save_artifact
    artifact = source.artifact
    kept = plain_state(model)
    rest = {name: kept.get(name, t) for name, t in artifact.tensors.items() if name not in shared}
    tensors, info = encode_tensors(rest, shared, cfg)
    info["clustered_params"] = sum(w.indices.numel() for w in shared.values())
    info["float_params"] = sum(t.numel() for t in rest.values() if t.is_floating_point())
    path = out_dir / Path(model_path).name
    provenance = {"stage": "compress", "inputs": source.inputs, "step": cfg.cluster_steps + cfg.quant_steps}
    save_artifact(path, tensors, artifact.kind, artifact.config, provenance, {**artifact.extra, "compression": info})

    device = next(model.parameters()).device
    after = evaluate(source, load_model(path)[0].to(device))  # read back as every stage reads it
    size_before, size_after = Path(model_path).stat().st_size, path.stat().st_size
    report = {"model": str(model_path), "artifact": str(path), "kind": artifact.kind, "clusters": cfg.clusters,
              "clustered_tensors": len(shared), "clustered_params": info["clustered_params"],
              "float_params": info["float_params"],
              "size_bytes": {"before": size_before, "after": size_after}, "ratio": size_before / size_after,
              "metric": source.metric,
              "quality": {**quality, "after": after}}
    atomic_write_json(out_dir / "report.json", report)
    return report
