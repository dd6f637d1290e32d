"""Every example command of the seed's README (seeds/002), in its order, with its JSON configs verbatim and
its flags as written; only the paths are filled in. The deviations, each forced by the seed's own text:

- the seed's configs fix the feature map at 4 x 32 x 32 (codebook image_H/W/C) with two down-samplings
  (autoencoder num_layers 2): the images are 128 x 128, in colour (image_channel 3);
- the seed shows one codebook config (8 x 8 patches); the condition codebook is the same config with a
  patch as large as the map, and the two finer levels the same with 4 x 4 and 2 x 2 patches, so that the
  seed's three-level generation config has a base and two cascade models to run;
- generate_fmap_dataset.py's example writes `model-path` without its dashes: it is `--model-path` here;
- train_quantized_transformer.py is train_transformer.py here;
- the seed's --prune-threshold 1000 keeps no unit of a folder this small: the run says so, names the
  threshold that keeps the units serving 90% of the patches, and the chain goes on with that one.
The folder holds three pictures (two for training, one held out): at 128 x 128 with the seed's 256 to 512
channels, the autoencoder alone costs about 0.26 TFLOP per image and pass.
"""
import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import run_script

pytestmark = pytest.mark.slow  # the slow tier: make test-all

AUTOENCODER = {"model_lr": 1e-5, "image_channel": 3, "min_channel": 256, "max_channel": 512, "num_layers": 2,
               "latent_channel": 4, "hidden_activation_type": "silu", "use_final_enc_activation": True,
               "encoder_activation_type": "tanh", "use_final_dec_activation": True, "decoder_activation_type": "tanh"}
CODEBOOK = {"model_lr": 1e-4, "image_H": 32, "image_W": 32, "image_C": 4, "patch_H": 8, "patch_W": 8,
            "num_embeddings": 512, "neighbourhood_step": 200}
TRANSFORMER = {"model_lr": 1e-4, "use_sliding_window": True, "sliding_window": 256, "num_enc_layers": 5,
               "num_dec_layers": 7, "self_attn_heads": 64, "cross_attn_heads": 64, "in_dim": 512, "hidden_dim": 2048,
               "hidden_activation": "silu"}
LEVELS = [(16, 32, 1.5), (8, 4, 1.0), (8, 4, 1.5)]  # the seed's beam_width, num_beam, temperature per level


def colour_folder(root, count=3, size=128):
    """Colour pictures of two kinds: a disc and a bar, each in its own colour and place."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(count):
        kind = ["disc", "bar"][i % 2]
        (root / kind).mkdir(parents=True, exist_ok=True)
        cy, cx = rng.uniform(40, 88, 2)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < 30 ** 2 if kind == "disc" else abs(x - cx) < 12
        image = np.zeros((size, size, 3), np.uint8) + rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        image[mask] = rng.integers(120, 255, 3)
        Image.fromarray(image).save(root / kind / f"{i}.png")
    return root


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_seeds_example_commands_run_as_written(tmp_path):
    def write(name, settings):
        (tmp_path / name).write_text(json.dumps(settings, indent=4))
        return tmp_path / name

    ok(run_script("build_dataset.py", "--source", colour_folder(tmp_path / "pictures"), "--out-dir", tmp_path / "data",
                  "--size", "128", "--channels", "3", "--train-count", "2"))
    dataset = tmp_path / "data" / "dataset.json"

    ok(run_script("train_autoencoder.py", "--device", "cpu", "--dataset-path", dataset, "--batch-size", "8",
                  "--checkpoint-step", "1000", "--lr-step", "50000", "--max-epoch", "1",
                  "--config-path", write("autoencoder.json", AUTOENCODER), "--out-dir", tmp_path / "autoencoder"))
    autoencoder = tmp_path / "autoencoder" / "autoencoder.safetensors"

    ok(run_script("generate_fmap_dataset.py", "--device", "cpu", "--batch-size", "64", "--num-files-folder", "1000",
                  "--dataset-path", dataset, "--model-path", autoencoder, "--out-dir", tmp_path / "fmaps"))
    fmaps = tmp_path / "fmaps" / "dataset.json"

    pruned = {}
    for level, patch in (("cond", 32), ("l1", 8), ("l2", 4), ("l3", 2)):
        config = write(f"codebook_{level}.json", {**CODEBOOK, "patch_H": patch, "patch_W": patch})
        ok(run_script("train_codebook.py", "--device", "cpu", "--dataset-path", fmaps, "--decoder-path", autoencoder,
                      "--batch-size", "8", "--checkpoint-step", "1000", "--lr-step", "50000", "--max-epoch", "1",
                      "--config-path", config, "--out-dir", tmp_path / "codebooks" / level))
        prune = ["--device", "cpu", "--dataset-path", fmaps, "--codebook-path",
                 tmp_path / "codebooks" / level / "codebook.safetensors", "--batch-size", "64",
                 "--out-dir", tmp_path / "pruned" / level]
        refused = run_script("prune_codebook.py", *prune, "--prune-threshold", "1000")
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        suggested = re.search(r"--prune-threshold (\d+) would keep", refused.stderr).group(1)
        ok(run_script("prune_codebook.py", *prune, "--prune-threshold", suggested))
        pruned[level] = tmp_path / "pruned" / level / "codebook.safetensors"

    transformer_config = write("transformer.json", TRANSFORMER)
    models = []
    for index, (coarse, fine) in enumerate((("cond", "l1"), ("l1", "l2"), ("l2", "l3"))):
        out = tmp_path / "transformers" / str(index)
        ok(run_script("train_transformer.py", "--device", "cpu", "--dataset-path", fmaps,
                      *(["--train-base-model"] if index == 0 else []), "--decoder-path", autoencoder,
                      "--lr-codebook-path", pruned[coarse], "--hr-codebook-path", pruned[fine], "--test-num-sample", "8",
                      "--batch-size", "64", "--temperature", "0.7", "--checkpoint-step", "1000", "--lr-step", "50000",
                      "--max-epoch", "1", "--use-activation-checkpoint", "--config-path", transformer_config,
                      "--out-dir", out))
        models.append((out / "model.safetensors", pruned[coarse], pruned[fine]))

    generation = {str(i): {"model_path": str(model), "lr_codebook_path": str(coarse), "hr_codebook_path": str(fine),
                           "beam_width": width, "num_beam": beams, "temperature": temperature}
                  for i, ((model, coarse, fine), (width, beams, temperature)) in enumerate(zip(models, LEVELS))}
    ok(run_script("generate_images.py", "--device", "cpu", "--decoder-path", autoencoder, "--num-images", "5",
                  "--seed", "69", "--config-path", write("generate.json", generation), "--out-dir", tmp_path / "generated"))
    images = sorted((tmp_path / "generated" / "images").glob("*/*.png"))
    assert len(images) == 5 and Image.open(images[0]).size == (128, 128) and Image.open(images[0]).mode == "RGB"
