import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import (SMALL_TRANSFORMER, build_dataset, interrupt_paused, random_inputs, run_script,
                     small_transformer, start_script, wait_paused, write_shape_folder)
from core.generator import Generator, changed_level, image_generators
from core.artifacts import load_artifact
from core.errors import PipelineError
from core.model_artifacts import load_transformer
from core.models.sampling import sample_tokens
from core.models.transformer import (Dropout, TokenTransformer, TransformerConfig, attend, decoder_input, sequence_logits,
                                     window_starts)
from core.stages import fmaps
from core.stages.transformer import tuning_scope
from core.objectives.transformer import (adapt_augment_rows, drop_labels, grow_label_rows, load_token_data,
                                         objective)

@pytest.mark.parametrize("kind", ["base", "cascade"])
@pytest.mark.parametrize("window", [None, 4])
def test_causality(kind, window):
    model = small_transformer(kind, window=window)
    labels, lr, hr = random_inputs(model)
    reference = sequence_logits(model, labels, lr, hr)
    assert reference.shape == (3, 12, 7)
    for k in range(12):
        changed = hr.clone()
        changed[:, k] = (changed[:, k] + 1) % 7
        logits = sequence_logits(model, labels, lr, changed)
        assert torch.allclose(logits[:, :k + 1], reference[:, :k + 1], atol=1e-6), k  # position k is predicted before it is seen
        if k + 1 < 12:
            assert not torch.allclose(logits[:, k + 1], reference[:, k + 1])


def test_conditioning_changes_the_prediction():
    for kind in ("base", "cascade"):
        model = small_transformer(kind)
        labels, lr, hr = random_inputs(model)
        other_lr = (lr + 1) % 5
        assert not torch.allclose(sequence_logits(model, labels, lr, hr), sequence_logits(model, labels, other_lr, hr))


def test_window_schedule_tiles_the_sequence():
    assert window_starts(10, 16) == [(0, 0)]
    schedule = window_starts(20, 8)
    assert schedule[0] == (0, 0)
    covered = []
    for k, (start, first) in enumerate(schedule):
        end = min(20, start + 8)
        assert first - start >= 4 or start == 0  # at least half a window of context
        covered += list(range(first, end))
    assert covered == list(range(20))


@pytest.mark.parametrize("kind", ["base", "cascade"])
def test_tiny_model_memorises_sequences(kind):
    model = small_transformer(kind, dropout=0.0).train()
    labels, lr, hr = random_inputs(model, batch=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    positions = torch.arange(12).expand(4, 12)
    for _ in range(300):
        logits = model(labels, lr, decoder_input(hr, model.shape.start_token), positions)
        loss = F.cross_entropy(logits.reshape(-1, 7), hr.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_label_dropout_rates():
    labels = torch.arange(1000) % 3
    assert torch.equal(drop_labels(labels, 0.0, 3), labels)
    assert (drop_labels(labels, 1.0, 3) == 3).all()
    dropped = (drop_labels(labels, 0.25, 3) == 3).float().mean().item()
    assert 0.2 < dropped < 0.3


def train_cli(pipeline, out, *extra, base=False, config=None):
    args = ["--dataset-path", pipeline["fmaps"], "--out-dir", out, "--device", "cpu", "--batch-size", "8",
            "--max-epoch", "1000", "--decoder-path", pipeline["autoencoder"], "--test-num-sample", "3"]
    if base:
        args += ["--train-base-model", "--lr-codebook-path", pipeline["cond"], "--hr-codebook-path", pipeline["l1"]]
    else:
        args += ["--lr-codebook-path", pipeline["l1"], "--hr-codebook-path", pipeline["l2"]]
    if config is not None:
        args += ["--config-path", config]
    return args + [str(e) for e in extra]


@pytest.fixture
def tiny_config(tmp_path):
    def write(**overrides):
        path = tmp_path / f"tf_{len(list(tmp_path.glob('tf_*')))}.json"
        path.write_text(json.dumps({**SMALL_TRANSFORMER, "model_lr": 0.003, "warmup_steps": 5, **overrides}))
        return path
    return write


def test_base_and_cascade_stages_train(tmp_path, pipeline, tiny_config):
    for base in (True, False):
        out = tmp_path / ("base" if base else "cascade")
        result = run_script("train_transformer.py", *train_cli(pipeline, out, "--max-steps", "60",
                                                               "--checkpoint-step", "30", base=base,
                                                               config=tiny_config()))
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "heldout_loss" in r]
        assert len(evals) == 2 and evals[1]["heldout_loss"] < evals[0]["heldout_loss"]
        assert (out / "samples" / "samples_0000060.png").exists()
        model, artifact = load_transformer(out / "model.safetensors")
        assert model.shape.kind == ("base" if base else "cascade")
        assert model.shape.label_names == ["bar", "circle", "square"]
        assert ("cond_counts" in artifact.tensors) == base
        assert artifact.extra["hr_codebook"]["path"] == str(pipeline["l1" if base else "l2"])


def test_sliding_window_stage_trains(tmp_path, pipeline, tiny_config):
    out = tmp_path / "windowed"
    config = tiny_config(use_sliding_window=True, sliding_window=6)
    result = run_script("train_transformer.py", *train_cli(pipeline, out, "--max-steps", "80", "--checkpoint-step", "40",
                                                           "--use-activation-checkpoint", config=config))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert [r["heldout_loss"] for r in records if "heldout_loss" in r][-1] < 3.4  # below uniform over 32 units


@pytest.mark.slow
def test_resume_after_ctrl_c_equals_uninterrupted(tmp_path, pipeline, tiny_config):
    config = tiny_config(num_dec_layers=4, in_dim=64, hidden_dim=256)
    steps = ["--max-steps", "150", "--checkpoint-step", "1000", "--test-num-sample", "0", "--lr-step", "50"]
    reference = tmp_path / "reference"
    assert run_script("train_transformer.py", *train_cli(pipeline, reference, *steps, config=config)).returncode == 0
    out = tmp_path / "interrupted"
    proc = start_script("train_transformer.py", *train_cli(pipeline, out, *steps, config=config), pause_at=60)
    wait_paused(proc)
    interrupt_paused(proc)
    assert proc.returncode == 130
    assert load_artifact(out / "checkpoint.safetensors").extra["step"] == 60
    assert run_script("train_transformer.py", *train_cli(pipeline, out, *steps, config=config)).returncode == 0
    a = load_artifact(reference / "model.safetensors").tensors
    b = load_artifact(out / "model.safetensors").tensors
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_base_needs_a_condition_codebook(tmp_path, pipeline):
    args = ["--dataset-path", pipeline["fmaps"], "--out-dir", tmp_path / "x", "--train-base-model",
            "--lr-codebook-path", pipeline["l1"], "--hr-codebook-path", pipeline["l2"]]
    result = run_script("train_transformer.py", *args)
    assert result.returncode == 2
    assert "needs a condition codebook" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_load_optim_needs_a_checkpoint(tmp_path, pipeline, tiny_config):
    out = tmp_path / "first"
    assert run_script("train_transformer.py", *train_cli(pipeline, out, "--max-steps", "5", config=tiny_config())).returncode == 0
    result = run_script("train_transformer.py", *train_cli(pipeline, tmp_path / "second", "--max-steps", "5",
                                                           "--model-path", out / "model.safetensors", "--load-optim",
                                                           config=tiny_config()))
    assert result.returncode == 2 and "holds no optimizer state" in result.stderr
    result = run_script("train_transformer.py", *train_cli(pipeline, tmp_path / "third", "--max-steps", "5",
                                                           "--model-path", out / "checkpoint.safetensors", "--load-optim",
                                                           config=tiny_config()))
    assert result.returncode == 0, result.stderr


def test_fine_tuning_keeps_the_models_labels(tmp_path, models):
    """Few-shot: a base model fine-tuned (--init-from) on images of one class keeps its three labels."""
    build_dataset(models["dataset"], tmp_path / "few", 16, channels=1, holdout=0.0, seed=0, labels=["square"],
                  train_count=10)
    fmaps.run(fmaps.FmapArgs(dataset_path=tmp_path / "few" / "dataset.json", model_path=models["autoencoder"],
                             out_dir=tmp_path / "few_fmaps", device="cpu", batch_size=16, shard_size=100))
    out = tmp_path / "tuned"
    result = run_script("train_transformer.py", "--train-base-model", "--dataset-path", tmp_path / "few_fmaps" / "dataset.json",
                        "--lr-codebook-path", models["cond"], "--hr-codebook-path", models["l1"], "--out-dir", out,
                        "--init-from", models["base"], "--config-path", models["root"] / "tf.json", "--batch-size", "4",
                        "--max-steps", "6", "--device", "cpu", "--max-epoch", "100")
    assert result.returncode == 0, result.stderr
    model, artifact = load_transformer(out / "model.safetensors")
    assert model.shape.label_names == ["bar", "circle", "square"]
    counts, start_counts = artifact.tensors["cond_counts"], load_artifact(models["base"]).tensors["cond_counts"]
    assert counts[2].sum() == 10  # every training image is a square
    assert torch.equal(counts[:2], start_counts[:2])  # the labels without images keep what the model knew
    assert artifact.extra["label_origin"] == {"pretrained": ["bar", "circle", "square"], "tuned": ["square"]}


@pytest.mark.parametrize("scope, tuned", [("conditioning", ("label_emb.",)),
                                          ("upper", ("label_emb.", "decoder.1.", "ln_f.", "head.")),
                                          ("auto", ("label_emb.",))])
def test_tuning_in_a_scope_changes_only_its_weights(tmp_path, models, scope, tuned):
    """tune_scope: a base model (two decoder blocks) tuned on one class trains the scope's weights, all of
    them, and leaves every other weight as the start had it."""
    build_dataset(models["dataset"], tmp_path / "few", 16, channels=1, holdout=0.0, seed=0, labels=["square"],
                  train_count=10)
    fmaps.run(fmaps.FmapArgs(dataset_path=tmp_path / "few" / "dataset.json", model_path=models["autoencoder"],
                             out_dir=tmp_path / "few_fmaps", device="cpu", batch_size=16, shard_size=100))
    config = tmp_path / "tf.json"
    config.write_text(json.dumps({**json.loads((models["root"] / "tf.json").read_text()), "tune_scope": scope,
                                  "label_dropout": 0.0}))
    result = run_script("train_transformer.py", "--train-base-model", "--dataset-path",
                        tmp_path / "few_fmaps" / "dataset.json", "--lr-codebook-path", models["cond"],
                        "--hr-codebook-path", models["l1"], "--out-dir", tmp_path / "tuned", "--init-from",
                        models["base"], "--config-path", config, "--batch-size", "4", "--max-steps", "4",
                        "--device", "cpu", "--max-epoch", "100")
    assert result.returncode == 0, result.stderr
    start, tuned_artifact = load_artifact(models["base"]).tensors, load_artifact(tmp_path / "tuned" / "model.safetensors")
    weights = [key for key in start if key != "cond_counts"]
    changed = {key for key in weights if not torch.equal(start[key], tuned_artifact.tensors[key])}
    assert changed == {key for key in weights if key.startswith(tuned)}
    assert tuned_artifact.extra["tune_scope"] == ({"scope": "conditioning", "asked": "auto", "fewest_images_per_label": 10}
                        if scope == "auto" else {"scope": scope})


def test_the_auto_tune_scope_follows_the_fewest_original_images_of_a_tuned_label():
    def tokens(labels, heldout, augmented):
        data = SimpleNamespace(labels=torch.tensor(labels), is_heldout=torch.tensor(heldout))
        return SimpleNamespace(data=data, augmented=torch.tensor(augmented))
    auto = TransformerConfig(tune_scope="auto")
    many = [0] * 60 + [1] * 50
    assert tuning_scope(auto, tokens(many, [False] * 110, [0] * 110))["scope"] == "upper"
    # augmented copies and held-out images are not images of the tuning set: label 1 has 49 originals
    found = tuning_scope(auto, tokens(many + [1, 1], [False] * 111 + [True], [0] * 109 + [1, 1, 0]))
    assert found == {"scope": "conditioning", "asked": "auto", "fewest_images_per_label": 49}
    assert tuning_scope(TransformerConfig(tune_scope="upper"), tokens([0], [False], [0])) == {"scope": "upper"}


def test_grown_label_rows_keep_the_known_ones_and_start_new_ones_at_the_null_label():
    table = torch.arange(12.0).reshape(4, 3)  # three labels and the null label
    grown = grow_label_rows({"emb": table, "other": torch.ones(2)}, "emb", 5)
    assert grown["emb"].shape == (6, 3)
    assert torch.equal(grown["emb"][:3], table[:3]) and torch.equal(grown["emb"][-1], table[3])
    assert torch.equal(grown["emb"][3], table[3]) and torch.equal(grown["emb"][4], table[3])
    assert grow_label_rows({"emb": table}, "emb", 3)["emb"] is table


def test_tuning_on_a_new_label_learns_it_as_its_own(tmp_path, models):
    """Transfer: a base model tuned on images of a label it never saw grows that label, keeps its three, and
    generation draws the labels it was tuned on unless asked for another."""
    folder = write_shape_folder(tmp_path / "new", 12, {"stick": 2, "square": 1}, seed=7000)
    build_dataset(folder, tmp_path / "data", 16, channels=1, holdout=0.25)
    fmaps.run(fmaps.FmapArgs(dataset_path=tmp_path / "data" / "dataset.json", model_path=models["autoencoder"],
                             out_dir=tmp_path / "fmaps", device="cpu", batch_size=16, shard_size=100))
    for name, coarse, fine in (("base", "cond", "l1"), ("cascade", "l1", "l2")):
        result = run_script("train_transformer.py", *(["--train-base-model"] if name == "base" else []),
                            "--dataset-path", tmp_path / "fmaps" / "dataset.json", "--lr-codebook-path", models[coarse],
                            "--hr-codebook-path", models[fine], "--out-dir", tmp_path / name, "--init-from", models[name],
                            "--config-path", models["root"] / "tf.json", "--batch-size", "4", "--max-steps", "6",
                            "--device", "cpu", "--max-epoch", "100")
        assert result.returncode == 0, result.stderr
    out = tmp_path / "base"
    model, artifact = load_transformer(out / "model.safetensors")
    assert model.shape.label_names == ["bar", "circle", "square", "stick"]
    assert model.label_emb.weight.shape[0] == 5
    assert artifact.extra["label_origin"] == {"pretrained": ["bar", "circle", "square"], "tuned": ["square", "stick"]}
    config = json.loads(models["generate_config"].read_text())
    config["0"]["model_path"] = str(out / "model.safetensors")
    (tmp_path / "generate.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="level 1: .* knows the labels bar, circle, square; level 0's model "
                                            "bar, circle, square, stick"):
        Generator.load(tmp_path / "generate.json", models["autoencoder"])
    config["1"]["model_path"] = str(tmp_path / "cascade" / "model.safetensors")
    (tmp_path / "generate.json").write_text(json.dumps(config))
    generator = Generator.load(tmp_path / "generate.json", models["autoencoder"])
    assert {generator.label_names[i] for i in generator.draw_labels(image_generators(0, range(40)))} == {"square", "stick"}
    circle = generator.with_levels([changed_level(generator.levels[0], label="circle"), *generator.levels[1:]])
    images, labels = circle.sample(range(4), seed=0)
    assert images.shape == (4, 1, 16, 16) and labels == [1] * 4


def test_a_memorizing_run_is_called_out(tmp_path, models):
    """A transformer far larger than its 61 training sequences, trained long: its held-out loss turns up
    while its training loss falls, and the run says so."""
    config = tmp_path / "big.json"
    config.write_text(json.dumps({"in_dim": 64, "hidden_dim": 256, "num_dec_layers": 2, "self_attn_heads": 2,
                                  "model_lr": 0.01, "warmup_steps": 5, "label_dropout": 0.0, "weight_decay": 0.0}))
    out = tmp_path / "memorizer"
    result = run_script("train_transformer.py", "--train-base-model", "--dataset-path", models["fmaps"],
                        "--lr-codebook-path", models["cond"], "--hr-codebook-path", models["l2"], "--out-dir", out,
                        "--config-path", config, "--batch-size", "16", "--max-steps", "300", "--checkpoint-step", "20",
                        "--max-epoch", "1000", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "the model is memorizing its training set" in result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "heldout_loss" in r]
    best = min(evals, key=lambda r: r["heldout_loss"])
    assert evals[-1]["heldout_loss"] > best["heldout_loss"] and evals[-1]["train_loss"] < best["train_loss"]
    assert load_artifact(out / "model.safetensors").provenance["step"] == best["step"] < 300


@pytest.mark.parametrize("kind", ["base", "cascade"])
def test_the_augmentation_condition_is_an_original_unless_training_says_otherwise(kind):
    model = small_transformer(kind, augment_condition=True)
    labels, lr, hr = random_inputs(model)
    inputs, positions = decoder_input(hr, model.shape.start_token), torch.arange(12).expand(3, 12)
    unset = model(labels, lr, inputs, positions)
    assert torch.equal(unset, model(labels, lr, inputs, positions, augmented=torch.zeros(3, dtype=torch.long)))
    assert not torch.allclose(unset, model(labels, lr, inputs, positions, augmented=torch.ones(3, dtype=torch.long)))


@pytest.mark.parametrize("kind", ["base", "cascade"])
def test_sampling_never_sets_the_augmentation_condition(kind):
    """The augmented row changes nothing that sampling or the held-out evaluation computes; the original row does."""
    model = small_transformer(kind, augment_condition=True)
    labels, lr, hr = random_inputs(model)

    def outputs():
        tokens = sample_tokens(model, labels, lr, generator=torch.Generator().manual_seed(3))
        return tokens, sequence_logits(model, labels, lr, hr)

    tokens, logits = outputs()
    with torch.no_grad():
        model.augment_emb.weight[1] += 5.0
    assert all(torch.equal(a, b) for a, b in zip(outputs(), (tokens, logits)))
    with torch.no_grad():
        model.augment_emb.weight[0] += 5.0
    assert not torch.allclose(outputs()[1], logits)


def test_training_batches_say_which_maps_are_augmented_copies(tmp_path, pipeline):
    augment = tmp_path / "augment.json"
    augment.write_text(json.dumps({"augment_flip": True, "augment_shift": 1}))
    fmaps.run(fmaps.FmapArgs(dataset_path=pipeline["dataset"], model_path=pipeline["autoencoder"], out_dir=tmp_path / "fm",
                             device="cpu", augment_copies=2, augment_config=augment))
    tokens = load_token_data(tmp_path / "fm" / "dataset.json", pipeline["l1"], pipeline["l2"], base=False)
    train_ids = (~tokens.data.is_heldout).nonzero().flatten()
    copies = [bool(tokens.data.records[i].get("augmented")) for i in train_ids.tolist()]
    assert 0 < sum(copies) == 2 * (len(copies) - sum(copies))
    cfg = TransformerConfig(**{**SMALL_TRANSFORMER, "augment_condition": True})
    batch = objective(cfg, tokens.shape, tokens, torch.device("cpu")).get_batch(torch.arange(len(train_ids)))
    assert batch["augmented"].tolist() == [int(c) for c in copies]
    plain = TransformerConfig(**SMALL_TRANSFORMER)
    assert "augmented" not in objective(plain, tokens.shape, tokens, torch.device("cpu")).get_batch(torch.arange(4))


@pytest.mark.parametrize("start_has, tuned_has", [(False, True), (True, False)])
def test_a_model_tuned_across_the_augmentation_condition_starts_as_its_start(start_has, tuned_has):
    start = small_transformer("cascade", augment_condition=start_has)
    if start_has:
        with torch.no_grad():
            start.augment_emb.weight.normal_()
    tuned = small_transformer("cascade", augment_condition=tuned_has)
    tensors = adapt_augment_rows(dict(start.state_dict()), "", tuned_has, tuned.cfg.in_dim)
    tuned.load_state_dict(tensors)
    labels, lr, hr = random_inputs(start)
    assert torch.allclose(sequence_logits(tuned, labels, lr, hr), sequence_logits(start, labels, lr, hr), atol=1e-5)


def test_label_smoothing_is_off_by_default_and_raises_a_confident_loss(pipeline, tiny_config):
    tokens = load_token_data(pipeline["fmaps"], pipeline["l1"], pipeline["l2"], base=False)
    losses = []
    for smoothing in (0.0, 0.2):
        cfg = TransformerConfig(**{**SMALL_TRANSFORMER, "label_smoothing": smoothing, "label_dropout": 0.0})
        torch.manual_seed(0)
        model = TokenTransformer(cfg, tokens.shape).train()
        task = objective(cfg, tokens.shape, tokens, torch.device("cpu"))
        batch = task.get_batch(torch.arange(8))
        torch.manual_seed(1)
        losses.append(task.loss_fn(model, batch, 0).item())
        if smoothing == 0.0:
            torch.manual_seed(1)
            logits = model(batch["labels"], batch["coarse"], batch["input"], batch["positions"])
            assert losses[0] == pytest.approx(F.cross_entropy(logits.reshape(-1, 32), batch["targets"].reshape(-1)).item())
    assert losses[1] != pytest.approx(losses[0])


def test_cpu_training_attention_equals_the_fused_kernel():
    """The plain computation a CPU training step takes gives the fused kernel's outputs and gradients."""
    q, k, v = (torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(i), requires_grad=True)
               for i in range(3))
    for causal, mask in ((True, None), (False, None), (False, torch.rand(9, 9).tril() > 0.3)):
        if mask is not None:
            mask.fill_diagonal_(True)
        plain = attend(q, k, v, mask=mask, causal=causal, dropout_p=0.0)
        with torch.no_grad():
            fused = attend(q, k, v, mask=mask, causal=causal, dropout_p=0.0)
        assert torch.allclose(plain, fused, atol=1e-5)
        expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
                                       .square().sum(), (q, k, v))
        for got, want in zip(torch.autograd.grad(plain.square().sum(), (q, k, v)), expected):
            assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_drops_its_share_and_keeps_the_mean(p):
    torch.manual_seed(0)
    x = torch.ones(200_000)
    out = Dropout(p).train()(x)
    assert abs((out == 0).float().mean().item() - p) < 0.005
    assert abs(out.mean().item() - 1) < 0.01
    assert torch.equal(Dropout(p).eval()(x), x)
    torch.manual_seed(0)
    again = Dropout(p).train()(x)
    assert torch.equal(out, again)  # the draws follow torch's seed, so resumed runs stay exact
