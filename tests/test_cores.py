"""core.cores: the stages running side by side share the machine's cores."""
import subprocess
import sys

import torch

from core.cores import CoreShare


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
