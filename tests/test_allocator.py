"""mmoe_core.allocator: freed tensor memory is kept in the process (glibc), so big temporaries stop being
page-faulted in again at every allocation."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
if {tuned}:
    from mmoe_core.allocator import keep_freed_memory
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    y = torch.ones(10 * 2**20)  # a 40 MiB temporary, freed each time round
    del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tuned: bool) -> int:
    code = PROBE.format(root=str(ROOT), tuned=tuned)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_reused_not_faulted_in_again():
    untuned, tuned = _faults(False), _faults(True)
    # 40 MiB is above glibc's largest automatic mmap threshold (32 MiB), so untuned every round maps fresh
    # pages (20 x 10,240 faults); tuned, the heap block is reused (measured: 4-8 rounds fault, not 20)
    assert untuned > 150_000 and tuned * 2 < untuned, (untuned, tuned)
