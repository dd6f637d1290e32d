"""The machine's cores shared between the stages running on it at the same time (make -j, or two runs):
each stage process holds a file named by its pid in one folder per user, and sets torch's threads to its
share of the cores, rechecked as stages start and finish. A stage running alone uses every core it was
given (OMP_NUM_THREADS, or torch's default); two share them."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

CHECK_EVERY_S = 2.0  # how often a running stage recounts the stages beside it


class CoreShare:
    def __init__(self, folder: Path | None = None):
        self.folder = folder or Path(tempfile.gettempdir()) / f"qarig-cores-{os.getuid()}"
        self.cores = torch.get_num_threads()  # what this process was given
        self.entry = self.folder / str(os.getpid())
        self.checked = 0.0

    def __enter__(self) -> "CoreShare":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.entry.touch()
        except OSError:  # a read-only temp folder: no sharing, every stage keeps its threads
            return self
        self.adjust(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.entry.unlink(missing_ok=True)

    def running(self) -> int:
        """Stage processes alive now, this one included; entries of processes that died are removed."""
        alive = 0
        for entry in self.folder.iterdir():
            try:
                os.kill(int(entry.name), 0)
                alive += 1
            except (ValueError, ProcessLookupError):
                entry.unlink(missing_ok=True)
            except PermissionError:  # another user's process with a reused pid: not ours to count
                pass
        return max(alive, 1)

    def adjust(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.checked < CHECK_EVERY_S:
            return
        self.checked = now
        if not self.entry.exists():
            return
        threads = max(1, self.cores // self.running())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


share = CoreShare()


def adjust_threads() -> None:
    """Recount the running stages (at most every CHECK_EVERY_S) and take this process's share of the cores."""
    share.adjust()
