"""Process-level settings for CPU runs (custom.runtime)."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from custom.runtime import keep_freed_memory, skip_exit_collection
from custom.user_inputs import OptionError

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: eight 30 MB feature maps written, freed together (as a network pass leaves its activations),
# then written again. Prints whether the settings applied, how many MB of the first eight glibc served as separate
# mappings, how many MB of heap it still holds once they are freed, and the page faults of the second eight.
ALLOCATIONS = """
import ctypes, resource, sys, torch
from custom.runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory(sys.argv[1])
size = 30 << 20  # under the 32 MB glibc accepts as its mmap threshold, larger than any block start-up frees
mapped_before = libc.mallinfo2().hblkhd
maps = [torch.empty(size // 4).fill_(1.0) for _ in range(8)]
mapped = libc.mallinfo2().hblkhd - mapped_before
del maps
heap_kept = libc.mallinfo2().arena
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
maps = [torch.empty(size // 4).fill_(1.0) for _ in range(8)]
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, mapped >> 20, heap_kept >> 20, faults)
"""


def _allocations(enabled: str) -> tuple[str, int, int, int]:
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATIONS, enabled], cwd=ROOT, capture_output=True, text=True, check=True
    )
    applied, mapped_mb, heap_kept_mb, faults = result.stdout.split()
    return applied, int(mapped_mb), int(heap_kept_mb), int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_freed_feature_maps_are_reused_instead_of_faulted_in_again():
    applied_off, mapped_off, _, faults_off = _allocations("false")
    applied_on, mapped_on, heap_kept_on, faults_on = _allocations("true")
    assert (applied_off, applied_on) == ("False", "True")
    # by default each 30 MB map is a mapping of its own, returned to the system when freed
    assert mapped_off >= 8 * 30
    # kept: served from the heap, which keeps the freed maps' pages, so writing the next maps faults far fewer in
    assert mapped_on == 0
    assert heap_kept_on >= 8 * 30
    assert faults_on < faults_off / 4


def test_without_mallopt_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a C library that has no mallopt
    assert keep_freed_memory() is False


def test_the_option_is_a_boolean():
    assert keep_freed_memory("false") is False
    with pytest.raises(OptionError, match="keep_freed_memory"):
        keep_freed_memory("sometimes")


# In a fresh process: an object in a reference cycle, reachable from a module until the interpreter tears the modules
# down at exit; its finaliser says whether the exit collection reached it.
LEFT_AT_EXIT = """
import sys
from custom.runtime import skip_exit_collection

class Node:
    def __del__(self):
        print("collected at exit", flush=True)

node = Node()
node.self = node
print(skip_exit_collection(sys.argv[1]), skip_exit_collection(sys.argv[1]), flush=True)
"""


def _left_at_exit(enabled: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", LEFT_AT_EXIT, enabled], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return result.stdout.splitlines()


def test_the_exit_collection_is_skipped_only_when_asked():
    assert _left_at_exit("false") == ["False False", "collected at exit"]
    assert _left_at_exit("true") == ["True True"]


def test_the_exit_option_is_a_boolean():
    with pytest.raises(OptionError, match="skip_exit_collection"):
        skip_exit_collection("maybe")
