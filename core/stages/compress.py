"""The compression stage (seed 000): the chosen weights of a trained autoencoder or transformer are
clustered into shared values and the model fine-tuned on its own stage's objective; then the shared
values are quantized to int8 and the model fine-tuned again. The compressed artifact keeps the source
model's kind and config (its encoding: core.codec), so every stage reads it like the original."""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.nn as nn

from core.artifacts import Artifact, atomic_write_json, file_record, save_artifact
from core.codec import encode_tensors
from core.config import load_config, option, to_dict
from core.errors import PipelineError
from core.model_artifacts import AUTOENCODER, load_model
from core.models.quantized import SharedWeight, plain_state, set_quantize, share_weights
from core.objectives import autoencoder, transformer
from core.training import Objective, Trainer, TrainArgs, TrainOptions, claim_out_dir, finish_run, setup_run


@dataclass
class CompressConfig:
    """Defaults: the tiny preset's transformers (a preset's compress_*.json hold both stages' settings)."""
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


@dataclass
class CompressArgs:
    model_path: Path
    dataset_path: Path  # the model's training data: image dataset (autoencoder) or feature maps (transformer)
    options: TrainOptions  # the fine-tuning's (its steps come from the config)
    config_path: Path | None = None


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
    model, artifact = load_model(model_path)
    if "compression" in artifact.extra:
        raise PipelineError(f"{model_path} is already compressed; compress the model it was made from")
    kind = artifact.kind
    if kind == AUTOENCODER:
        data = autoencoder.load_images(dataset_path, model.cfg)
        if "quantized_by" in artifact.extra:  # a decoder tuned to a codebook is fine-tuned through it too
            codebook = recorded_file(artifact, "quantized_by", model_path)
            autoencoder.attach_codebook(model, codebook, data.items.shape[-1], device)
        task = autoencoder.objective(model.cfg, data, device)
        return Source(kind, model, artifact, task, "heldout_psnr", [file_record(model_path), file_record(dataset_path)])
    books = {key: recorded_file(artifact, key, model_path) for key in ("lr_codebook", "hr_codebook")}
    tokens = transformer.load_token_data(dataset_path, books["lr_codebook"], books["hr_codebook"],
                                         model.shape.kind == "base")
    for field in ("kind", "coarse_vocab", "fine_vocab", "coarse_len", "fine_len", "num_labels"):
        if getattr(tokens.shape, field) != getattr(model.shape, field):
            raise PipelineError(f"{dataset_path} gives {field} {getattr(tokens.shape, field)}, but {model_path} "
                                f"was trained with {getattr(model.shape, field)}")
    task = transformer.objective(model.cfg, model.shape, tokens, device)
    inputs = [file_record(p) for p in (model_path, dataset_path, books["lr_codebook"], books["hr_codebook"])]
    return Source(kind, model, artifact, task, "heldout_loss", inputs)


def recorded_file(artifact: Artifact, key: str, model_path: Path) -> Path:
    """A file the model was trained with (its extra[key] names it), still here and unchanged."""
    record = artifact.extra.get(key) or {}
    path = Path(record.get("path", ""))
    if not path.is_file():
        raise PipelineError(f"{model_path} was trained with {key} {record.get('path')!r}, which is not a file here")
    if file_record(path)["sha256"] != record.get("sha256"):
        raise PipelineError(f"{model_path}: its {key} {path} has changed since the model was trained")
    return path


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


def evaluate(source: Source, model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        value = source.task.evaluate(model)[source.metric]
    model.train()
    return value


def run(args: CompressArgs) -> dict:
    """Cluster, fine-tune, quantize and fine-tune again; write the compressed artifact and report.json
    into out_dir, and return the report. Each fine-tuning phase has its own sub-folder and checkpoint."""
    options = args.options
    cfg = load_config(CompressConfig, args.config_path)
    env = setup_run(options.device, options.seed)
    source = load_source(args.model_path, args.dataset_path, env.device)
    names = select_tensors(source.model, cfg, args.model_path)
    if source.task.num_items < options.batch_size:
        raise PipelineError(f"{args.dataset_path} has {source.task.num_items} training items, fewer than "
                            f"--batch-size {options.batch_size}")
    run_config = {"compress": to_dict(cfg), "model": source.inputs[0]["sha256"]}  # inputs[0]: the model's record
    saved = claim_out_dir(options.out_dir, run_config, options.resume, options.overwrite, env)
    if saved["model"] != run_config["model"]:
        raise PipelineError(f"--resume: {options.out_dir} compresses another model than {args.model_path}")
    cfg = CompressConfig(**saved["compress"])

    model = source.model.to(env.device)
    before = evaluate(source, model)
    shared = share_weights(model, names, clusters=cfg.clusters, per_channel=cfg.per_channel, init=cfg.init,
                           iters=cfg.kmeans_iters, seed=options.seed)
    clustered = evaluate(source, model)
    phases = [("cluster", cfg.cluster_steps, cfg.cluster_lr, False), ("quantize", cfg.quant_steps, cfg.quant_lr, True)]
    for index, (phase, steps, lr, quantize) in enumerate(phases):
        set_quantize(shared, quantize)
        if steps == 0:
            continue
        torch.manual_seed(options.seed + index)
        train_args = TrainArgs(options.out_dir / phase, f"compress_{phase}", batch_size=options.batch_size,
                               max_epoch=steps, max_steps=steps, checkpoint_step=options.checkpoint_step, lr=lr,
                               seed=options.seed, config={"phase": phase, **saved})
        claim_out_dir(train_args.out_dir, train_args.config, False, options.overwrite, env)  # same config: continues
        Trainer(env, model, source.task, train_args).fit()

    report = {}
    if env.is_main:
        quality = {"before": before, "clustered_no_finetune": clustered}
        report = write_outputs(model, shared, source, cfg, args.model_path, options.out_dir, quality)
    finish_run(env)
    return report


def write_outputs(model: nn.Module, shared: dict[str, SharedWeight], source: Source, cfg: CompressConfig,
                  model_path: Path, out_dir: Path, quality: dict) -> dict:
    """Write the compressed artifact, read it back as the stages do (its quality after), and write report.json."""
    artifact = source.artifact
    kept = plain_state(model)
    rest = {name: kept.get(name, t) for name, t in artifact.tensors.items() if name not in shared}
    codes = {name: weight.codes() for name, weight in shared.items()}
    tensors, info = encode_tensors(rest, codes, clusters=cfg.clusters, per_channel=cfg.per_channel,
                                   entropy_coding=cfg.entropy_coding, float16_rest=cfg.float16_rest)
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
