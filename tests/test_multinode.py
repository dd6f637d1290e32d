"""Two-node torchrun launches (c10d rendezvous), as two "nodes" on this machine: generation splits the
batches and makes the images of one process; training runs data parallel."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_AE, generate_cli, generated_files, script_env
from core.artifacts import load_artifact

pytestmark = pytest.mark.slow  # the slow tier: make test-all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(script: str, *args, timeout: float = 120) -> list[str]:
    """Run `script` on two nodes of one process each; returns each node's stderr."""
    port = free_port()
    nodes = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", "qarig-test", "--local-addr", "127.0.0.1", str(ROOT / script), *map(str, args)]
        # each node in its own session, so that a hang kills its workers too
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=script_env(), cwd=ROOT, start_new_session=True))
    outputs = []
    try:
        for node in nodes:
            _, stderr = node.communicate(timeout=timeout)
            assert node.returncode == 0, stderr[-3000:]
            outputs.append(stderr)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two-node launch did not finish in {timeout} s")
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.communicate()
    return outputs


def test_two_nodes_generate_the_images_of_one_process(tmp_path, models):
    flags = ["--num-images", 21, "--batch-size", 4, "--seed", 11]
    single = tmp_path / "single"
    assert generate_cli(models, single, *flags).returncode == 0
    out = tmp_path / "two"
    launch_two_nodes("generate_images.py", "--config-path", models["generate_config"], "--decoder-path",
                     models["autoencoder"], "--out-dir", out, "--device", "cpu", *flags)
    assert generated_files(out) == generated_files(single)
    logs = sorted(p.name for p in (out / "progress").glob("*.jsonl"))
    assert logs == ["0.jsonl", "1.jsonl"]  # both processes made batches
    assert all((out / "progress" / name).read_text() for name in logs)


def test_two_nodes_train(tmp_path, tiny_dataset, tiny_ae_config):
    out = tmp_path / "ddp"
    launch_two_nodes("train_autoencoder.py", "--dataset-path", tiny_dataset, "--config-path", tiny_ae_config,
                     "--out-dir", out, "--device", "cpu", "--batch-size", 8, "--max-epoch", 1000, "--max-steps", 10,
                     "--checkpoint-step", 5)
    artifact = load_artifact(out / "autoencoder.safetensors", "autoencoder")
    assert artifact.provenance["step"] == 10 and artifact.config["latent_channel"] == TINY_AE["latent_channel"]
    assert not list(out.glob(".*.tmp"))
