"""The one training loop every stage uses: devices, seeding, out-dir claims, resume, checkpoints,
signals, data parallel (torchrun), metrics.jsonl and a progress bar. The stage supplies the model,
a batch function, a loss, an evaluation and an export."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from core.artifacts import atomic_write_bytes, atomic_write_json, load_artifact, load_state, save_artifact, state_tensors
from core.console import console, notice
from core.cores import adjust_threads
from core.errors import Interrupted, PipelineError

CHECKPOINT = "checkpoint.safetensors"
RUN_FILE = "run.json"
METRICS = "metrics.jsonl"


# ---------------------------------------------------------------- devices and processes

PRECISIONS = ("auto", "float32")  # auto: bfloat16 autocast where the device multiplies it natively


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (CUDA with bfloat16, a CPU with AVX512-BF16 or
    AMX), where autocast to bfloat16 speeds training up instead of emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch's own probes of the CPU, private but stable since 2.1
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


@dataclass
class RunEnv:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise PipelineError(f"--device must be auto, cpu, cuda or mps, got '{name}'")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PipelineError("--device mps was asked for, but MPS is not available")
    return torch.device(name)


def setup_run(device: str, seed: int) -> RunEnv:
    """Pick the device, join the torchrun process group if there is one, and seed every RNG."""
    chosen = pick_device(device)
    env = RunEnv(chosen)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        env.rank, env.world_size = dist.get_rank(), dist.get_world_size()
        if chosen.type == "cuda":
            env.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(env.device)
    torch.manual_seed(seed)
    return env


def finish_run(env: RunEnv) -> None:
    if env.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- the out dir

def claim_out_dir(out_dir: Path, config: dict, resume: bool, overwrite: bool, env: RunEnv | None = None) -> dict:
    """Make `out_dir` this run's. Returns the config to train with: a run already there with the same
    config continues; one with another config is refused unless --resume (continue it, with its own
    config) or --overwrite (start over)."""
    run_file = out_dir / RUN_FILE
    chosen, fresh = _decide_claim(out_dir, run_file, config, resume, overwrite)
    distributed = env is not None and env.world_size > 1
    if distributed:
        dist.barrier()  # every rank has decided from the out dir as it was, before rank 0 changes it
    if fresh and (env is None or env.is_main):
        if overwrite:
            for name in (RUN_FILE, CHECKPOINT, METRICS):
                (out_dir / name).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, {"config": config})
    if distributed:
        dist.barrier()
    return chosen


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested settings as one level of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_diff(old: dict, new: dict, shown: int = 3) -> str:
    """The settings that differ, old -> new, e.g. "transformer.sliding_window: 256 -> 16"."""
    old, new = flatten(old), flatten(new)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, "<none>") != new.get(k, "<none>")]
    shorten = lambda v: v if len(v) <= 40 else v[:37] + "..."
    parts = [f"{k}: {shorten(json.dumps(old.get(k)))} -> {shorten(json.dumps(new.get(k)))}" for k in changed[:shown]]
    return ", ".join(parts) + (f" and {len(changed) - shown} more" if len(changed) > shown else "")


def _decide_claim(out_dir: Path, run_file: Path, config: dict, resume: bool, overwrite: bool) -> tuple[dict, bool]:
    """The config to train with, and whether the out dir starts a fresh run."""
    if run_file.exists() and not overwrite:
        saved = json.loads(run_file.read_text())["config"]
        if saved == config or resume:
            return saved, False
        raise PipelineError(f"{out_dir} holds a run with another config ({config_diff(saved, config)}); pass "
                            "--resume to continue it with its saved config, or --overwrite to start over")
    if resume and not run_file.exists():
        raise PipelineError(f"--resume: {out_dir} holds no run to resume")
    return config, True


# ---------------------------------------------------------------- the loop

@dataclass
class Objective:
    """What a stage trains on, built without training: how many training items there are, a batch of
    them by index, the loss of a model on a batch, and the model's held-out evaluation (a dict of
    metrics). Training and fine-tuning (compression) use the same one. `metric` names the evaluation's
    figure that chooses the checkpoint to keep; `heldout` is false when the data has no held-out split
    and the evaluation falls back to training items."""
    num_items: int
    get_batch: Callable[[torch.Tensor], object]
    # the loss, or (the loss, its terms as numbers to log beside it)
    loss_fn: Callable[[torch.nn.Module, object, int], torch.Tensor | tuple[torch.Tensor, dict]]
    evaluate: Callable[[torch.nn.Module], dict]
    items_per_batch: Callable[[object], int] | None = None
    metric: str | None = None
    higher_is_better: bool = False
    heldout: bool = True
    select_from: int = 0  # checkpoints before this step are exported but not kept as the best


@dataclass
class Best:
    """The checkpoint whose held-out figure is the best so far: its artifact is the one a stage keeps."""
    value: float | None = None
    step: int = 0
    train_loss: float | None = None  # the mean training loss over the steps before it

    def improved_by(self, value: float, higher_is_better: bool) -> bool:
        return self.value is None or (value > self.value if higher_is_better else value < self.value)

    def worse_by(self, value: float, higher_is_better: bool) -> float:
        """How much worse `value` is than the best, as a share of the best (0 when not worse)."""
        change = (self.value - value) if higher_is_better else (value - self.value)
        return max(0.0, change) / max(abs(self.value), 1e-12)


OVERFIT_SHARE = 0.02  # a held-out figure this much worse than its best, while the training loss falls
ETA_AFTER_STEPS = 10  # the expected wall time is printed once this many steps have run
# For tests: QARIG_PAUSE_AT=N stops the process (SIGSTOP) once, when a training stage has run N steps or
# generation has logged N batches, so that a test signals it at a chosen point instead of racing it.
PAUSE_ENV = "QARIG_PAUSE_AT"
_paused = False


def pause_point(done: int) -> None:
    global _paused
    at = os.environ.get(PAUSE_ENV)
    if at and not _paused and done >= int(at):
        _paused = True
        os.kill(os.getpid(), signal.SIGSTOP)


def duration(seconds: float) -> str:
    """A wall time as a person reads it: 45 s, 12 min, 1 h 20 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass(frozen=True)
class TrainOptions:
    """What the command line of every training stage gives (declared once, in core.cli)."""
    out_dir: Path
    device: str = "auto"
    batch_size: int = 64
    max_epoch: int = 1
    max_steps: int = 0  # 0: no limit besides max_epoch
    checkpoint_step: int = 1000
    lr_step: int = 0  # >0: halve the learning rate every lr_step steps (the seed's schedule); 0: cosine
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    precision: str = "auto"  # one of PRECISIONS

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise PipelineError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")

    def for_stage(self, *, stage: str, lr: float, config: dict, warmup_steps: int = 0, weight_decay: float = 0.0,
                  ema_decay: float = 0.0, patience_steps: int = 0, mixed_precision: bool = True) -> "TrainArgs":
        """The Trainer's arguments: these options, and what the stage's config decides (`mixed_precision`
        false: the stage needs float32 throughout)."""
        return TrainArgs(out_dir=self.out_dir, stage=stage, batch_size=self.batch_size, max_epoch=self.max_epoch,
                         max_steps=self.max_steps, checkpoint_step=self.checkpoint_step, lr=lr,
                         lr_step=self.lr_step, warmup_steps=warmup_steps, weight_decay=weight_decay,
                         ema_decay=ema_decay, patience_steps=patience_steps, seed=self.seed,
                         log_every=self.log_every, mixed_precision=mixed_precision and self.precision == "auto",
                         config=config)


@dataclass(frozen=True)
class TrainArgs:
    out_dir: Path
    stage: str
    batch_size: int = 64
    max_epoch: int = 1
    max_steps: int = 0  # 0: no limit besides max_epoch
    checkpoint_step: int = 1000
    lr: float = 1e-3
    lr_step: int = 0  # >0: halve the learning rate every lr_step steps (the seed's schedule); 0: cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # >0: evaluate and export an exponential moving average of the weights
    patience_steps: int = 0  # >0: stop when the held-out figure has not improved for this many steps
    seed: int = 0
    log_every: int = 10
    mixed_precision: bool = True  # bfloat16 autocast where the device multiplies it natively
    config: dict = field(default_factory=dict)  # the stage's config, stored in checkpoints


def learning_rate(args: TrainArgs, step: int, total_steps: int) -> float:
    """A pure function of the step, so that resuming needs no scheduler state."""
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0
    if args.lr_step > 0:
        return args.lr * warm * 0.5 ** (step // args.lr_step)
    progress = min(1.0, step / max(1, total_steps))
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(decay: float, step: int) -> float:
    """The averaging decay after `step` updates: it ramps up as (1 + step) / (10 + step), so that a short
    run's average is not held back by its starting weights."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """An exponential moving average of a model's weights, kept in a copy of the model; buffers (norm
    statistics, codebooks attached to it) follow the trained model as they are."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        weight = 1 - ema_decay_at(self.decay, step)
        for average, param in zip(self.model.parameters(), model.parameters()):
            average.lerp_(param.detach(), weight)
        for average, buffer in zip(self.model.buffers(), model.buffers()):
            average.copy_(buffer)


def steps_to_take(num_items: int, batch_size: int, max_epoch: int, max_steps: int) -> int:
    """A run's steps: whole batches per epoch for max_epoch epochs, at most max_steps (0: no limit)."""
    total = max_epoch * (num_items // batch_size)
    return min(total, max_steps) if max_steps > 0 else total


class Trainer:
    """Trains `model` on `objective`. At every checkpoint it evaluates, calls `preview(model, step)` (sample
    grids, and any figures that depend on the step, returned as a dict) and `export(model, step)` (the
    stage's artifact), and writes checkpoint.safetensors. With `args.ema_decay` these three see the
    weights' moving average instead of the trained weights; with `args.patience_steps` training ends early
    once the held-out figure has not improved for that many steps."""

    def __init__(self, env: RunEnv, model: torch.nn.Module, objective: Objective, args: TrainArgs, *,
                 export: Callable[[torch.nn.Module, int], None] | None = None,
                 preview: Callable[[torch.nn.Module, int], dict | None] | None = None,
                 optimizer_from: Path | None = None):
        self.env, self.model, self.args = env, model.to(env.device), args
        self.objective, self.export, self.preview = objective, export, preview
        self.optimizer_from = optimizer_from
        if args.batch_size % env.world_size:
            raise PipelineError(f"--batch-size {args.batch_size} does not split evenly over {env.world_size} processes")
        self.num_items = objective.num_items
        if args.batch_size > self.num_items:  # a small folder: every step sees all of it
            usable = self.num_items - self.num_items % env.world_size
            if usable == 0:
                raise PipelineError(f"the dataset has {self.num_items} training items, fewer than the "
                                    f"{env.world_size} processes")
            notice(f"--batch-size {args.batch_size} is more than the {self.num_items} training items: "
                   f"batches of {usable}")
            args = self.args = replace(args, batch_size=usable)
        self.steps_per_epoch = self.num_items // args.batch_size
        self.total_steps = steps_to_take(self.num_items, args.batch_size, args.max_epoch, args.max_steps)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           betas=(0.9, 0.99))
        self.average = WeightAverage(self.model, args.ema_decay) if args.ema_decay > 0 else None
        self.ddp_model = model
        if env.world_size > 1:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.step = 0
        self.stopped_early = False
        self.best = Best()
        self.interval_losses: list[float] = []  # training losses since the last checkpoint
        self.stop_requested = False
        self.out_dir = args.out_dir
        self.metrics_path = self.out_dir / METRICS
        self.autocast = args.mixed_precision and native_bfloat16(env.device)

    # -- checkpoints

    def save_checkpoint(self) -> None:
        if not self.env.is_main:
            return
        tensors = state_tensors(self.model, "model.")
        if self.average is not None:
            tensors.update(state_tensors(self.average.model, "ema."))
        optim = self.optimizer.state_dict()
        scalars = {}
        for index, state in optim["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{index}.{key}"] = value
                else:
                    scalars[f"{index}.{key}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.env.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.env.device)
        extra = {"step": self.step, "param_groups": optim["param_groups"], "optim_scalars": scalars,
                 "best": asdict(self.best), "stopped_early": self.stopped_early}
        save_artifact(self.out_dir / CHECKPOINT, tensors, "checkpoint", self.args.config,
                      {"stage": self.args.stage, "step": self.step}, extra)

    def restore_checkpoint(self) -> bool:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            if self.optimizer_from is not None:  # fine-tuning that keeps another run's optimizer state
                self._load_optimizer(load_artifact(self.optimizer_from, "checkpoint"))
            return False
        ckpt = load_artifact(path, "checkpoint")
        load_state(self.model, ckpt.tensors, path, prefix="model.")
        if self.average is not None:
            load_state(self.average.model, ckpt.tensors, path, prefix="ema.")
        self._load_optimizer(ckpt)
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        if "rng.cuda" in ckpt.tensors and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt.tensors["rng.cuda"], self.env.device)
        self.step = int(ckpt.extra["step"])
        self.best = Best(**ckpt.extra.get("best", {}))
        self.stopped_early = bool(ckpt.extra.get("stopped_early", False))
        self._truncate_metrics()
        return True

    def _load_optimizer(self, ckpt) -> None:
        state: dict[int, dict] = {}
        for name, value in ckpt.tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value.to(self.env.device) if key != "step" else value
        for name, value in ckpt.extra["optim_scalars"].items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
        groups = ckpt.extra["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise PipelineError(f"{ckpt.path}: its optimizer state is for another model")
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    # -- metrics

    def log(self, record: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop metrics logged after the checkpoint we resume from: those steps run again."""
        if not self.env.is_main or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= self.step]
        atomic_write_bytes(self.metrics_path, "".join(line + "\n" for line in kept).encode())

    def _record_run(self) -> None:
        """run.json keeps the batch size the run trains with (it may have been clipped to the data) and its
        autocast (a resume is bit-exact with the same one)."""
        run_file = self.out_dir / RUN_FILE
        if self.env.is_main and run_file.exists():
            run = json.loads(run_file.read_text())
            recorded = {"batch_size": self.args.batch_size, "autocast": "bfloat16" if self.autocast else None}
            if any(run.get(key) != value for key, value in recorded.items()):
                atomic_write_json(run_file, {**run, **recorded})

    # -- signals

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` is set on any process."""
        if self.env.world_size > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.env.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    # -- the loop

    def batch_indices(self, step: int) -> torch.Tensor:
        """This process's share of step's batch: a fixed permutation per epoch, so resume replays it."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if getattr(self, "_epoch", None) != epoch:
            generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(self.num_items, generator=generator), epoch
        batch = self._order[index * self.args.batch_size:(index + 1) * self.args.batch_size]
        return batch[self.env.rank::self.env.world_size]

    def checkpoint(self, final: bool = False) -> None:
        """Evaluate, export the artifact if this is the best checkpoint so far (or if the objective names no
        figure to choose by), warn when the model starts to memorize, decide whether patience has run out,
        and write the resume checkpoint."""
        if self.env.is_main:
            net = self.average.model if self.average is not None else self.model
            self.model.eval()
            with torch.no_grad():
                record = self.objective.evaluate(net)
                if self.preview is not None:
                    record.update(self.preview(net, self.step) or {})
            self.model.train()
            train_loss = sum(self.interval_losses) / len(self.interval_losses) if self.interval_losses else None
            self.interval_losses = []
            keep = self._judge(record, train_loss)
            if record:
                self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **record,
                          "train_loss": train_loss, "best_step": self.best.step})
                self._print_checkpoint(record, keep)
            if keep and self.export is not None:
                self.export(net, self.step)
            if not final and self._out_of_patience():
                self._stop_early()
            elif final and not keep and self.export is not None:
                notice(f"{self.label}: the artifact keeps step {self.best.step}, whose "
                       f"{self.objective.metric} ({self.best.value:.4g}) is the best; step {self.step} has "
                       f"{record[self.objective.metric]:.4g}")
        self.save_checkpoint()

    @property
    def label(self) -> str:
        """The stage and its out dir's name in what it prints (two transformers may train side by side)."""
        return f"{self.args.stage} {self.out_dir.name}"

    def _print_checkpoint(self, record: dict, best: bool) -> None:
        """Without a live progress bar (make -j, a log file), one line per held-out evaluation."""
        metric = self.objective.metric
        if console.is_interactive or metric not in record:
            return
        console.print(f"{self.label}: step {self.step}/{self.total_steps}, {metric} {record[metric]:.4g}"
                      f"{' (best so far)' if best else ''}", highlight=False)

    def _print_eta(self, first_step: int, elapsed: float) -> None:
        left = self.total_steps - self.step
        per_step = elapsed / (self.step - first_step)
        early = " (less if it stops early)" if self.args.patience_steps > 0 else ""
        notice(f"{self.label}: {per_step:.2f} s a step; about {duration(left * per_step)} for the "
               f"{left} steps left{early}, besides held-out evaluations")

    def _out_of_patience(self) -> bool:
        patience = self.args.patience_steps
        return (patience > 0 and self.objective.heldout and self.best.value is not None
                and self.step - self.best.step >= patience)

    def _stop_early(self) -> None:
        message = (f"{self.objective.metric} has not improved for {self.step - self.best.step} steps (patience "
                   f"{self.args.patience_steps}): stopped at step {self.step} of {self.total_steps}; the artifact "
                   f"keeps step {self.best.step} ({self.best.value:.4g})")
        notice(f"{self.label}: {message}")
        self.log({"step": self.step, "early_stop": message, "best_step": self.best.step})
        self.stopped_early = True

    def _judge(self, record: dict, train_loss: float | None) -> bool:
        """Whether this checkpoint is the best so far; warns when the held-out figure has turned worse by
        more than OVERFIT_SHARE while the training loss kept falling."""
        metric, higher = self.objective.metric, self.objective.higher_is_better
        if metric is None or metric not in record or self.step < self.objective.select_from:
            return True
        value = record[metric]
        if self.best.improved_by(value, higher):
            self.best = Best(value, self.step, train_loss)
            return True
        worse = self.best.worse_by(value, higher)
        falling = train_loss is not None and self.best.train_loss is not None and train_loss < self.best.train_loss
        if self.objective.heldout and worse > OVERFIT_SHARE and falling:
            message = (f"{metric} went from {self.best.value:.4g} at step {self.best.step} to {value:.4g} at step "
                       f"{self.step} ({worse:.0%} worse) while the training loss fell from "
                       f"{self.best.train_loss:.4g} to {train_loss:.4g}: the model is memorizing its training set")
            notice(f"{self.label}: {message}; the artifact keeps step {self.best.step}")
            self.log({"step": self.step, "warning": "overfitting", "message": message})
        return False

    def fit(self) -> int:
        """Train to total_steps (continuing from a checkpoint if there is one). Returns the last step."""
        resumed = self.restore_checkpoint()
        self._record_run()
        if not self.objective.heldout and self.objective.metric and self.env.is_main and not resumed:
            notice(f"{self.label}: the data has no held-out split, so {self.objective.metric} is measured on "
                   "training items and memorization cannot be seen")
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.model.train()
        try:
            with self._progress(resumed) as (progress, task):
                seen, started, first_step = 0, time.perf_counter(), self.step
                loss_ema = None
                while self.step < self.total_steps and not self.stopped_early:
                    adjust_threads()
                    batch = self.objective.get_batch(self.batch_indices(self.step))
                    lr = learning_rate(self.args, self.step, self.total_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                        loss = self.objective.loss_fn(self.ddp_model, batch, self.step)
                    loss, terms = loss if isinstance(loss, tuple) else (loss, {})
                    if not torch.isfinite(loss):
                        raise PipelineError(f"loss became {loss.item()} at step {self.step}; lower model_lr")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if self.args.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
                    self.optimizer.step()
                    if self.average is not None:
                        self.average.update(self.model, self.step)
                    self.step += 1
                    count = self.objective.items_per_batch
                    seen += count(batch) if count else self.args.batch_size
                    value = loss.item()
                    self.interval_losses.append(value)
                    loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
                    rate = seen * self.env.world_size / (time.perf_counter() - started)
                    if self.step % self.args.log_every == 0:
                        self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": value,
                                  **terms, "lr": lr, "items_per_s": rate})
                    if self.step - first_step == ETA_AFTER_STEPS and self.env.is_main:
                        self._print_eta(first_step, time.perf_counter() - started)
                    if progress is not None:
                        progress.update(task, completed=self.step, status=f"loss {loss_ema:.4f} | {rate:.0f} items/s")
                    if self.step % self.args.checkpoint_step == 0 and self.step < self.total_steps:
                        self.checkpoint()
                        self.stopped_early = self._any_process(self.stopped_early)
                    pause_point(self.step)
                    if self._any_process(self.stop_requested):
                        self.save_checkpoint()
                        raise Interrupted(f"stopped at step {self.step}; checkpoint written to "
                                          f"{self.out_dir / CHECKPOINT}; run the same command to resume")
                if not self.stopped_early:
                    self.checkpoint(final=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.step

    @contextmanager
    def _progress(self, resumed: bool):
        if not self.env.is_main:
            yield None, None
            return
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
        with Progress(*columns) as progress:
            label = self.args.stage + (" (resumed)" if resumed else "")
            task = progress.add_task(label, total=self.total_steps, completed=self.step, status="")
            yield progress, task
