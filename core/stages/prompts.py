"""Generation from a file of prompts, one image set per prompt: the k-th prompt's images are a generation run of
their own in OUT/set_k (with seed + k, level 0's prompt set to it), and OUT gathers them: dataset.json of every
set's images with their captions (a captioned dataset the other stages accept), grid.png with one row per
prompt, and prompts.json (each prompt, its folder and seed)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from core.artifacts import atomic_write_json
from core.config import to_dict
from core.data import read_image_files, read_records, read_table, write_dataset_json
from core.errors import PipelineError
from core.pictures import save_image_grid
from core.stages import generate
from core.stages.generate import GenerateArgs

GRID_COLUMNS = 8


@dataclass
class PromptsArgs:
    generate: GenerateArgs  # num_images: per prompt; out_dir: where the sets go
    prompts_path: Path
    progress: Callable[[Iterable], Iterator] = iter


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; empty lines and lines starting with # are skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: cannot read prompts ({e})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise PipelineError(f"{path}: no prompts (one per line)")
    return prompts


def run(args: PromptsArgs) -> Path:
    """Generate every prompt's set (a set already made by the same run is kept), then gather them."""
    config_path, out_dir = args.generate.config_path, args.generate.out_dir
    prompts = read_prompts(args.prompts_path)
    configs = generate.parse_config(config_path)
    levels = generate.load_levels(configs, config_path)
    for k, prompt in enumerate(prompts):  # every prompt checked before any image is made
        levels[0].settings.prompt = prompt
        generate.check_prompts(levels, Path(f"{args.prompts_path} line {k + 1}"))
    sets = []
    for k, prompt in enumerate(args.progress(prompts)):
        folder = out_dir / f"set_{k:03d}"
        levels_config = {str(i): {**to_dict(cfg), **({"prompt": prompt} if i == 0 else {})}
                         for i, cfg in enumerate(configs)}
        atomic_write_json(folder / "generate.json", levels_config)
        seed = args.generate.seed + k
        generate.run(replace(args.generate, config_path=folder / "generate.json", out_dir=folder, seed=seed,
                             progress=iter))
        sets.append({"prompt": prompt, "folder": folder.name, "seed": seed})
    return gather(out_dir, sets)


def gather(out_dir: Path, sets: list[dict]) -> Path:
    """OUT/dataset.json of every set's records (paths into the sets), grid.png and prompts.json."""
    records, info, rows, runs = [], {}, [], []
    for entry in sets:
        set_records, info = read_records(out_dir / entry["folder"] / "dataset.json")
        runs += read_table(out_dir / entry["folder"] / "dataset.json", "runs")
        records += [{**r, "image_fpath": f"{entry['folder']}/{r['image_fpath']}", "run": len(runs)}
                    for r in set_records]
        rows += [out_dir / entry["folder"] / r["image_fpath"] for r in set_records[:GRID_COLUMNS]]
    save_image_grid(read_image_files(rows), out_dir / "grid.png", columns=GRID_COLUMNS)
    write_dataset_json(out_dir / "dataset.json", records, {**info, "images": len(records), "prompts": len(sets)},
                       {"runs": runs})
    atomic_write_json(out_dir / "prompts.json", {"sets": sets, "grid": "grid.png: one row per prompt, in this order"})
    return out_dir / "dataset.json"
