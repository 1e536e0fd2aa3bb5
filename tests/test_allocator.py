from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate, write and free a 64 MiB tensor 16 times (like one activation buffer per batch); print the minor
# page faults of the last 4 rounds. With the heap kept, glibc reuses freed blocks once a few of them have
# coalesced (alignment padding keeps the very first freed block from fitting the next request).
PROBE = """
import resource, sys, torch
from minima.core.allocator import keep_freed_memory
applied = keep_freed_memory()
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20, dtype=torch.float32); t.fill_(1.0); del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [faults_of_one_round() for _ in range(16)]
print(applied, sum(faults[-4:]))
"""


def _probe(env_value: str | None) -> tuple[bool, int]:
    env = dict(os.environ)
    env.pop("MINIMA_MALLOC", None)
    if env_value is not None:
        env["MINIMA_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.slow  # several processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_tensor_memory_is_reused_without_page_faults() -> None:
    applied, faults = _probe(None)
    assert applied
    # 64 MiB in 4 KiB pages is 16,384 pages: the default allocator maps them afresh in every round (one
    # fault each), the kept heap reuses them.
    assert faults < 1_000
    default_applied, default_faults = _probe("default")
    assert not default_applied
    assert default_faults > 4 * 8_000
