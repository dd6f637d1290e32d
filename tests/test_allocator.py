"""core.allocator: the memory a training step frees stays in the process instead of being faulted in afresh at
the next step."""
import subprocess
import sys

from conftest import ROOT

FAULTS_PER_STEP = """
import resource, sys, torch, torch.nn.functional as F
from core.allocator import keep_freed_memory
from core.models.classifier import FeatureClassifier
torch.set_num_threads(1)
if sys.argv[1] == "kept":
    assert keep_freed_memory()
model = FeatureClassifier(1, 10)
x, y = torch.rand(64, 1, 32, 32), torch.randint(0, 10, (64,))
def step():
    F.cross_entropy(model(x), y).backward()
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_step(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return float(result.stdout)


def test_a_training_step_reuses_the_memory_the_last_one_freed():
    default, kept = faults_per_step("default"), faults_per_step("kept")
    assert default > 300  # glibc's defaults: the step's activations mapped and zeroed afresh
    assert kept < default / 4
