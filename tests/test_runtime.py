"""Process-level settings for CPU runs (custom.runtime)."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from custom.runtime import keep_freed_memory
from custom.user_inputs import OptionError

ROOT = Path(__file__).resolve().parents[1]

# page faults of five rounds of eight 16 MB feature maps written and then freed together (as a network pass leaves
# its activations), after one such warm-up series
FAULTS = """
import resource, sys, torch
from custom.runtime import keep_freed_memory
applied = keep_freed_memory(sys.argv[1])
def rounds():
    for _ in range(5):
        maps = [torch.empty(4 << 20).fill_(1.0) for _ in range(8)]
        del maps
rounds()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(enabled: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", FAULTS, enabled], cwd=ROOT, capture_output=True, text=True, check=True
    )
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_freed_feature_maps_are_reused_instead_of_faulted_in_again():
    applied_off, faults_off = _faults("false")
    applied_on, faults_on = _faults("true")
    assert (applied_off, applied_on) == ("False", "True")
    # by default the freed maps go back to the system and every round faults them in again (4,096 faults per map);
    # kept, the next round reuses their pages
    assert faults_off > 5 * 8 * 1000
    assert faults_on < faults_off / 10


def test_without_mallopt_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert keep_freed_memory() is False


def test_the_option_is_a_boolean():
    assert keep_freed_memory("false") is False
    with pytest.raises(OptionError, match="keep_freed_memory"):
        keep_freed_memory("sometimes")
