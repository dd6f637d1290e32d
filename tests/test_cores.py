"""core.cores: the stages running side by side share the machine's cores."""
import subprocess
import sys
import threading

import torch

from core.cores import CoreShare, in_parallel


def test_a_stage_takes_its_share_of_the_cores_while_another_runs_and_all_of_them_after(tmp_path):
    before = torch.get_num_threads()
    share = CoreShare(tmp_path / "cores")
    share.cores = 4
    try:
        with share:
            assert torch.get_num_threads() == 4
            other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            (tmp_path / "cores" / str(other.pid)).touch()
            (tmp_path / "cores" / "999999999").touch()  # a stage that died without removing its entry
            share.adjust(force=True)
            assert torch.get_num_threads() == 2
            other.kill()
            other.wait()
            share.adjust(force=True)
            assert torch.get_num_threads() == 4
            assert sorted(p.name for p in (tmp_path / "cores").iterdir()) == [share.entry.name]
        assert not share.entry.exists()
    finally:
        torch.set_num_threads(before)


def test_in_parallel_runs_the_tasks_side_by_side_on_one_thread_each_and_keeps_their_order():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    both_running = threading.Barrier(2, timeout=20)  # broken unless two tasks run at once
    threads_seen = []

    def task(i: int) -> int:
        both_running.wait()
        threads_seen.append(torch.get_num_threads())
        return i * i
    try:
        assert in_parallel(task, [3, 4, 5, 6]) == [9, 16, 25, 36]
        assert threads_seen == [1, 1, 1, 1]
        assert torch.get_num_threads() == 2  # the process's threads back after
        torch.set_num_threads(1)
        assert in_parallel(lambda i: (i, torch.get_num_threads()), [1, 2]) == [(1, 1), (2, 1)]  # one core: in turn
    finally:
        torch.set_num_threads(before)
