"""bench.memory's sampling: a process tree's RSS and PSS, per process and summed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from slimserve.bench.memory import Peaks, Sample, Sampler, heavy_imports_of, read_memory, tree

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux")

# A parent that holds ~40 MB and forks a child that holds ~80 MB more, then both wait.
_TREE = """
import os, sys, time
a = bytearray(40 * 2**20)
r, w = os.pipe()
if os.fork() == 0:
    b = bytearray(80 * 2**20)
    os.write(w, b"x")  # allocated: the parent may say ready
    time.sleep(30); os._exit(0)
os.read(r, 1)
print("ready", flush=True); time.sleep(30)
"""


def test_a_tree_is_sampled_per_process_and_summed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        with Sampler(proc.pid, interval_s=0.05) as sampler:
            time.sleep(0.5)
        peaks = sampler.phases["load"]
        roles = {role for role, _ in peaks.per_process}
        assert "server" in roles  # depth 0
        assert len(peaks.per_process) == 2
        parent = next(s for (r, _), s in peaks.per_process.items() if r == "server")
        child = next(s for (r, _), s in peaks.per_process.items() if r != "server")
        assert parent.rss > 40e6 and child.rss > 80e6
        # The child's copy of the parent's 40 MB is shared until written: PSS splits it.
        assert child.pss < child.rss
        assert peaks.sum_pss <= peaks.sum_rss
        assert {pid for pid, _ in tree(proc.pid)} == {pid for _, pid in peaks.per_process}
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_peaks_keep_the_maximum_of_each_and_of_the_sum() -> None:
    peaks = Peaks()
    peaks.add({("a", 1): Sample(10, 5), ("b", 2): Sample(1, 1)})
    peaks.add({("a", 1): Sample(4, 4), ("b", 2): Sample(20, 2)})
    assert peaks.per_process == {("a", 1): Sample(10, 5), ("b", 2): Sample(20, 2)}
    assert (peaks.sum_rss, peaks.sum_pss) == (24, 6)
    assert read_memory(2**22 + 12345) is None  # no such process


def test_the_server_module_imports_neither_transformers_nor_torchao() -> None:
    heavy = heavy_imports_of("slimserve.server.app")
    assert "transformers" not in heavy
    assert "torchao" not in heavy
