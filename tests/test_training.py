"""The training contracts, exercised through train_autoencoder.py as a user runs it."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_AE, interrupt_paused, run_script, script_env, start_script, wait_paused
from core.artifacts import load_artifact
from core.training import RunEnv, native_bfloat16


def train_args(dataset, config, out, *extra):
    return ["--dataset-path", dataset, "--config-path", config, "--out-dir", out, "--device", "cpu",
            "--batch-size", "8", "--max-epoch", "1000", *extra]


def checkpoint_step(out):
    path = out / "checkpoint.safetensors"
    return load_artifact(path).extra["step"] if path.exists() else 0


@pytest.fixture
def slow_config(tmp_path):
    """Big enough that a run lasts a few seconds on one thread, so it can be killed midway; with
    augmentation and a discriminator from step 20, which a resumed run must replay exactly too."""
    path = tmp_path / "slow.json"
    path.write_text(json.dumps({**TINY_AE, "min_channel": 16, "max_channel": 16, "num_res_blocks": 2,
                                "augment_flip": True, "augment_shift": 1, "augment_jitter": 0.1,
                                "disc_weight": 0.5, "disc_start": 20, "disc_width": 8}))
    return path


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_dataset, slow_config):
    steps = ["--max-steps", "120", "--checkpoint-step", "10"]
    reference = tmp_path / "reference"
    assert run_script("train_autoencoder.py", *train_args(tiny_dataset, slow_config, reference, *steps)).returncode == 0

    killed = tmp_path / "killed"
    proc = start_script("train_autoencoder.py", *train_args(tiny_dataset, slow_config, killed, *steps), pause_at=35)
    wait_paused(proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_step(killed) == 30  # steps 31 to 35 are replayed

    resumed = run_script("train_autoencoder.py", *train_args(tiny_dataset, slow_config, killed, *steps))
    assert resumed.returncode == 0, resumed.stderr
    a = load_artifact(reference / "autoencoder.safetensors").tensors
    b = load_artifact(killed / "autoencoder.safetensors").tensors
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    metric_steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert metric_steps == sorted(metric_steps), "steps replayed after the kill are not logged twice"


@pytest.mark.slow
def test_ctrl_c_writes_checkpoint_and_exits_130(tmp_path, tiny_dataset, slow_config):
    out = tmp_path / "run"
    proc = start_script("train_autoencoder.py", *train_args(tiny_dataset, slow_config, out, "--max-steps", "100000"),
                        pause_at=7)
    wait_paused(proc)
    _, stderr = interrupt_paused(proc)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert checkpoint_step(out) == 7
    assert load_artifact(out / "checkpoint.safetensors", "checkpoint").tensors["rng.torch"].dtype == torch.uint8


def test_bad_config_one_line_nothing_written(tmp_path, tiny_dataset):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"min_chanel": 8}))
    out = tmp_path / "run"
    result = run_script("train_autoencoder.py", *train_args(tiny_dataset, config, out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {config}: unknown key 'min_chanel' (did you mean 'min_channel'?)"]
    assert not out.exists()

    config.write_text(json.dumps({"model_lr": -1}))
    result = run_script("train_autoencoder.py", *train_args(tiny_dataset, config, out))
    assert result.returncode == 2 and "'model_lr' is -1.0, must be between" in result.stderr
    assert not out.exists()


def test_other_config_in_out_dir_is_refused_and_kept(tmp_path, tiny_dataset, tiny_ae_config):
    out = tmp_path / "run"
    assert run_script("train_autoencoder.py", *train_args(tiny_dataset, tiny_ae_config, out, "--max-steps", "5")).returncode == 0
    before = (out / "autoencoder.safetensors").read_bytes()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_AE, "latent_channel": 3}))
    result = run_script("train_autoencoder.py", *train_args(tiny_dataset, other, out, "--max-steps", "5"))
    assert result.returncode == 2 and "holds a run with another config (latent_channel: 2 -> 3)" in result.stderr
    assert (out / "autoencoder.safetensors").read_bytes() == before


def test_missing_dataset_is_one_line(tmp_path, tiny_ae_config):
    missing = tmp_path / "none" / "dataset.json"
    result = run_script("train_autoencoder.py", *train_args(missing, tiny_ae_config, tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {missing}: no such dataset file"]


def test_init_from_wrong_kind(tmp_path, tiny_dataset, tiny_ae_config):
    out = tmp_path / "run"
    run_script("train_autoencoder.py", *train_args(tiny_dataset, tiny_ae_config, out, "--max-steps", "2"))
    result = run_script("train_autoencoder.py", *train_args(tiny_dataset, tiny_ae_config, tmp_path / "tune",
                                                            "--init-from", out / "checkpoint.safetensors"))
    assert result.returncode == 2
    assert "expected a autoencoder artifact, found kind 'checkpoint'" in result.stderr


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, tiny_dataset, tiny_ae_config):
    out = tmp_path / "ddp"
    # --local-addr: a host whose name does not resolve (as on some CI machines) hangs the rendezvous
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--local-addr", "127.0.0.1",
               str(ROOT / "train_autoencoder.py"), *map(str, train_args(tiny_dataset, tiny_ae_config, out,
                                                                         "--max-steps", "20", "--checkpoint-step", "10"))]
    # its own session, so that a hang kills the workers too rather than leaving them behind
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=script_env(), cwd=ROOT, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("torchrun did not finish in 180 s:\n" + process.communicate()[1][-2000:])
    assert process.returncode == 0, stderr[-2000:]
    assert stderr.count(f"wrote {out / 'autoencoder.safetensors'}") == 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["autoencoder.safetensors", "checkpoint.safetensors"]
    assert load_artifact(out / "autoencoder.safetensors", "autoencoder").provenance["step"] == 20
    assert not list(out.glob(".*.tmp"))


def fake_run(out, held_out_values, steps, exported, interrupt_at_call=None, output_dtypes=None, **train):
    """A one-weight model whose training loss falls every step, evaluated as `held_out_values` dictates
    (one value per checkpoint, every 5 steps); `exported` collects the steps whose artifact is written;
    `interrupt_at_call` asks the run to stop (as Ctrl-C does) at that evaluation; `output_dtypes` collects
    the dtype of the model's output in each training step; `train` adds TrainArgs."""
    from core.training import Objective, Trainer, TrainArgs, claim_out_dir
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    calls = []

    def evaluate(net):
        calls.append(1)
        if len(calls) == interrupt_at_call:
            trainer.stop_requested = True
        return {"heldout_loss": held_out_values[len(calls) - 1]}

    def loss(net, x, step):
        output = net(x)
        if output_dtypes is not None:
            output_dtypes.append(output.dtype)
        return output.float().pow(2).mean()

    objective = Objective(num_items=8, get_batch=lambda ids: torch.ones(len(ids), 1), loss_fn=loss,
                          evaluate=evaluate, metric="heldout_loss")
    args = TrainArgs(out, "test", batch_size=4, max_epoch=100, max_steps=steps, checkpoint_step=5, lr=0.05, **train)
    claim_out_dir(out, {"fake": 1}, resume=False, overwrite=False)
    trainer = Trainer(RunEnv(torch.device("cpu")), model, objective, args,
                      export=lambda net, step: exported.append((step, net.weight.item())))
    trainer.fit()
    return trainer


def exported_steps(exported):
    return [step for step, _ in exported]


def test_the_best_held_out_checkpoint_is_the_one_exported_and_memorizing_is_called_out(tmp_path):
    exported = []
    fake_run(tmp_path, [1.0, 0.8, 0.9, 0.95], steps=20, exported=exported)
    assert exported_steps(exported) == [5, 10]  # steps 15 and 20 are worse than step 10: the artifact stays step 10's
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    warnings = [r for r in records if r.get("warning") == "overfitting"]
    assert [w["step"] for w in warnings] == [15, 20]
    assert "heldout_loss went from 0.8 at step 10 to 0.9 at step 15" in warnings[0]["message"]
    assert [r["best_step"] for r in records if "heldout_loss" in r] == [5, 10, 10, 10]


def test_the_best_checkpoint_survives_a_resume(tmp_path):
    exported = []
    fake_run(tmp_path, [1.0, 0.8], steps=10, exported=exported)
    fake_run(tmp_path, [0.9, 0.85], steps=20, exported=exported)  # continues from step 10
    assert exported_steps(exported) == [5, 10]


def test_early_stopping_stops_at_the_patience_and_keeps_the_best(tmp_path, capsys):
    exported = []
    trainer = fake_run(tmp_path, [1.0, 0.8, 0.9, 0.95, 0.7], steps=40, exported=exported, patience_steps=10)
    assert trainer.step == 20  # step 10 was the best; 15 and 20 were not, and 20 is 10 steps on
    assert exported_steps(exported) == [5, 10]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stops = [r for r in records if "early_stop" in r]
    assert [r["step"] for r in stops] == [20] and stops[0]["best_step"] == 10
    assert "stopped at step 20 of 40; the artifact keeps step 10" in capsys.readouterr().err.replace("\n", " ")
    assert load_artifact(tmp_path / "checkpoint.safetensors").extra["step"] == 20

    again = fake_run(tmp_path, [0.1], steps=40, exported=exported, patience_steps=10)  # the same command again
    assert again.step == 20 and exported_steps(exported) == [5, 10]  # it neither trains on nor exports


def test_without_patience_a_run_trains_to_the_end(tmp_path):
    trainer = fake_run(tmp_path, [1.0, 0.8, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99], steps=40, exported=[])
    assert trainer.step == 40


def test_weight_average_is_exported_differs_from_the_trained_weights_and_resumes_exactly(tmp_path):
    values = [1.0 - 0.01 * i for i in range(8)]
    reference = fake_run(tmp_path / "reference", values, steps=40, exported=(ref_exported := []), ema_decay=0.9)
    raw, average = reference.model.weight.item(), reference.average.model.weight.item()
    assert abs(raw - average) > 1e-3  # the weight falls every step, and its average lags behind
    assert ref_exported[-1] == (40, pytest.approx(average))  # the artifact holds the average

    with pytest.raises(Exception, match="stopped at step 15"):
        fake_run(tmp_path / "resumed", values, steps=40, exported=[], interrupt_at_call=3, ema_decay=0.9)
    fake_run(tmp_path / "resumed", values, steps=40, exported=[], ema_decay=0.9)
    tensors = [load_artifact(run / "checkpoint.safetensors").tensors for run in (tmp_path / "reference", tmp_path / "resumed")]
    assert {"model.weight", "ema.weight"} <= set(tensors[0])
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in ("model.weight", "ema.weight"))


def test_a_stage_prints_its_expected_wall_time_after_its_first_steps(tmp_path, capsys):
    fake_run(tmp_path, [1.0] * 8, steps=40, exported=[])
    lines = [line for line in capsys.readouterr().err.splitlines() if "s a step; about" in line]
    assert len(lines) == 1 and "for the 30 steps left" in lines[0]


def test_without_a_live_bar_each_held_out_evaluation_prints_a_line_naming_the_run(tmp_path, capsys):
    fake_run(tmp_path / "cascade", [3.0, 2.0, 2.5] + [2.5] * 5, steps=40, exported=[])
    lines = [line for line in capsys.readouterr().err.splitlines() if "step 1" in line and "/40, " in line]
    assert lines[0].endswith(" cascade: step 10/40, heldout_loss 2 (best so far)") and "best" not in lines[1], lines


@pytest.mark.parametrize("mixed_precision", [True, False])
def test_training_autocasts_to_bfloat16_where_the_device_multiplies_it_natively_and_says_so(tmp_path, mixed_precision):
    dtypes = []
    fake_run(tmp_path, [1.0, 0.9], steps=10, exported=[], output_dtypes=dtypes, mixed_precision=mixed_precision)
    bfloat16 = mixed_precision and native_bfloat16(torch.device("cpu"))
    assert set(dtypes) == {torch.bfloat16 if bfloat16 else torch.float32}
    assert json.loads((tmp_path / "run.json").read_text())["autocast"] == ("bfloat16" if bfloat16 else None)


def test_precision_float32_turns_autocast_off_and_an_unknown_one_is_one_line(tmp_path, tiny_dataset, tiny_ae_config):
    for precision in ("auto", "float32"):
        out = tmp_path / precision
        result = run_script("train_autoencoder.py", *train_args(tiny_dataset, tiny_ae_config, out, "--max-steps", "2",
                                                                "--precision", precision))
        assert result.returncode == 0, result.stderr
        native = precision == "auto" and native_bfloat16(torch.device("cpu"))
        assert json.loads((out / "run.json").read_text())["autocast"] == ("bfloat16" if native else None)
    result = run_script("train_autoencoder.py", *train_args(tiny_dataset, tiny_ae_config, tmp_path / "half",
                                                            "--precision", "half"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --precision must be one of auto, float32, got 'half'"]
    assert not (tmp_path / "half").exists()


def test_durations_read_as_a_person_says_them():
    from core.training import duration
    assert [duration(s) for s in (45, 12 * 60, 80 * 60)] == ["45 s", "12 min", "1 h 20 min"]
