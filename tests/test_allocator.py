"""vericar/allocator.py: glibc's malloc keeps freed memory when vericar is imported, unless opted out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "import vericar.allocator as a, vericar; print(a.applied)"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
@pytest.mark.parametrize("env,expected", [({}, "True"), ({"VERICAR_MALLOC": "default"}, "False")])
def test_importing_vericar_tunes_glibc_malloc_unless_opted_out(env, expected):
    base = {k: v for k, v in os.environ.items() if k != "VERICAR_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=base | env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_a_large_tensor_freed_and_allocated_again_costs_no_new_page_faults():
    """The measurable effect: a 64 MiB block (over glibc's largest mmap threshold) is reused, not faulted in."""
    code = ("import resource, vericar, torch\n"
            "for _ in range(20):\n    x = torch.ones(16 * 2**20); del x\n"  # 64 MiB, freed (warm-up: the heap
            # settles after a few rounds)
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(5):\n    x = torch.ones(16 * 2**20); del x\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    faults = {}
    for setting in ("", "default"):
        env = {k: v for k, v in os.environ.items() if k != "VERICAR_MALLOC"} | {"VERICAR_MALLOC": setting}
        faults[setting] = int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                             check=True).stdout.strip())
    assert faults["default"] > 5 * 16_000 * 0.9  # glibc defaults: 64 MiB of fresh 4 KiB pages, five times
    assert faults[""] < 1_000
