"""Peak memory of a benchmark process (no torch import: the export's runner is measured without it)."""
import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM: ru_maxrss also counts what the process
    inherited from its parent before exec (here the benchmark's own, with its models loaded)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next((l for l in status.read_text().splitlines() if l.startswith("VmHWM:")), None)
        if line is not None:
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
