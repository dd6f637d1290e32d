"""The machine's cores shared between the stages running on it at the same time (make -j, or two runs):
each stage process holds a file named by its pid in one folder per user, and sets torch's threads to its
share of the cores, rechecked as stages start and finish. A stage running alone uses every core it was
given (OMP_NUM_THREADS, or torch's default); two share them."""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch

CHECK_EVERY_S = 2.0  # how often a running stage recounts the stages beside it
Item, Result = TypeVar("Item"), TypeVar("Result")


class CoreShare:
    def __init__(self, folder: Path | None = None):
        self.folder = folder or Path(tempfile.gettempdir()) / f"qarig-cores-{os.getuid()}"
        self.cores = torch.get_num_threads()  # what this process was given
        self.entry = self.folder / str(os.getpid())
        self.checked = 0.0
        self.workers = 0  # tasks running on one thread each (in_parallel); 0: torch's threads follow the share

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
        if not self.entry.exists() or self.workers:
            return
        threads = self.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def threads(self) -> int:
        """This process's share of its cores now."""
        return max(1, self.cores // self.running()) if self.entry.exists() else torch.get_num_threads()


share = CoreShare()


def adjust_threads() -> None:
    """Recount the running stages (at most every CHECK_EVERY_S) and take this process's share of the cores."""
    share.adjust()


class Sized:
    """An iterator with a length, for a progress bar's total."""
    def __init__(self, iterator: Iterator, length: int):
        self.iterator, self.length = iterator, length

    def __iter__(self) -> Iterator:
        return self.iterator

    def __len__(self) -> int:
        return self.length


def in_parallel(task: Callable[[Item], Result], items: Iterable[Item],
                progress: Callable[[Iterable], Iterator] = iter) -> list[Result]:
    """task(item) for every item, as many at once as this process has cores, each on one thread; the results in
    the items' order (`progress` wraps them as they come). Many small trainings (the report's classifiers) keep
    two cores busier one per core than each on both. A task must draw its random numbers from its own
    generators (torch's global one is shared by the threads)."""
    items = list(items)
    workers = min(len(items), share.threads())
    if workers <= 1 or share.workers:
        return list(progress(Sized(map(task, items), len(items))))

    def on_one_thread(item: Item) -> Result:
        torch.set_num_threads(1)  # OpenMP's thread count is each thread's own
        return task(item)
    threads_before, share.workers = torch.get_num_threads(), workers
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(progress(Sized(pool.map(on_one_thread, items), len(items))))
    finally:
        share.workers = 0
        torch.set_num_threads(threads_before)
        share.adjust(force=True)
