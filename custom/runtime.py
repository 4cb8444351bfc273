"""Process-level settings for running the network on CPU."""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
from typing import Any

__all__ = ["keep_freed_memory", "skip_exit_collection"]

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(enabled: Any = True, mmap_threshold_mb: int = 32, trim_threshold_mb: int = 1024) -> bool:
    """Let glibc's allocator reuse freed feature maps instead of handing them back to the system.

    By default glibc serves blocks of more than a few MB with fresh ``mmap`` pages and returns the top of its heap to
    the system once a few hundred kB are free, so every feature map of every network pass is written to freshly
    faulted-in pages. With blocks up to ``mmap_threshold_mb`` served from the heap (32 MB is the most glibc accepts
    on 64-bit systems) and up to ``trim_threshold_mb`` of free heap kept, the next pass reuses those pages. Worth
    it for a short-lived process that runs many passes (inference, evaluation); the process keeps up to
    ``trim_threshold_mb`` more resident memory between its peaks.

    Returns whether the settings were applied: ``False`` (and nothing changed) when ``enabled`` is false (a bool or
    "true" / "false", as the bundle option ``keep_freed_memory`` gives it) or where the C library is not glibc.
    """
    from custom.user_inputs import as_bool

    if not as_bool(enabled, "keep_freed_memory"):
        return False
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own symbols: its C library's
    except (OSError, TypeError):  # no such handle (Windows)
        mallopt = None
    if mallopt is None:
        logger.info("keep_freed_memory: the C library has no mallopt; allocator settings left as they are.")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb << 20)
    )
    if not applied:
        logger.info("keep_freed_memory: mallopt refused the settings; allocator settings left as they are.")
    return applied


def skip_exit_collection(enabled: Any = True) -> bool:
    """Spare the interpreter's last garbage collections when the process exits.

    At exit Python clears every module and collects garbage over all objects still alive; with MONAI's few thousand
    modules loaded that takes about a second, for memory the operating system reclaims anyway. This registers
    ``gc.freeze`` to run at exit (``atexit``), after the workflow and before that teardown: objects alive then are
    left out of the exit collections. Nothing changes while the process runs, so a long-lived process (a server, a
    test session) collects garbage as before. Objects that become unreachable only in that teardown and are part
    of a reference cycle are then not finalised (Python does not promise that ``__del__`` runs at exit): outputs
    are written and closed by the workflow itself.

    Returns whether the exit hook is registered (once per process, however often this is called): ``False`` when
    ``enabled`` is false (a bool or "true" / "false", as the bundle option ``skip_exit_collection`` gives it).
    """
    from custom.user_inputs import as_bool

    if not as_bool(enabled, "skip_exit_collection"):
        return False
    atexit.unregister(gc.freeze)  # at most one registration
    atexit.register(gc.freeze)
    return True
