"""Process-level settings: memory and exit on CPU, what a run prints (third-party warnings, progress lines)."""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["ProgressLog", "format_duration", "keep_freed_memory", "quiet_third_party", "skip_exit_collection"]

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


#: Packages whose warnings a user of the bundle cannot act on (deprecations, notes on optional accelerators ...).
THIRD_PARTY = (
    "monai",
    "torch",
    "transformers",
    "huggingface_hub",
    "tokenizers",
    "ignite",
    "nibabel",
    "pydicom",
    "highdicom",
    "PIL",
    "scipy",
    "skimage",
    "numpy",
)


class ThirdPartyWarnings(logging.Filter):
    """Drops WARNING records of the :data:`THIRD_PARTY` loggers; their INFO lines (an engine's progress) and errors
    pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and record.name.split(".")[0] in THIRD_PARTY)


def quiet_third_party(debug: Any = False) -> bool:
    """Hide what a user cannot act on: the warnings of the libraries the bundle runs on, their WARNING log records
    (:class:`ThirdPartyWarnings` on the root logger's handlers) and the transformers progress bars. The bundle's own
    warnings (e.g. ``ClinicalInputWarning``) still show. ``debug`` true (``--debug true``) leaves everything shown.

    Returns whether anything was hidden.
    """
    from custom.user_inputs import as_bool

    if as_bool(debug, "debug"):
        return False
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module=rf"({'|'.join(THIRD_PARTY)})(\.|$)")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ThirdPartyWarnings) for f in handler.filters):
            handler.addFilter(ThirdPartyWarnings())
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    return True


def format_duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s`` or ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class ProgressLog:
    """A progress line every ``every`` items and at the last: ``<what>: 20 of 96 cases, 41.0 s, about 2 min 36 s
    left``, for log files, where a progress bar shows nothing.

    Args:
        total: number of items.
        what: what is being done (``generating cases``).
        unit: name of the items (``cases``).
        every: items between lines; by default about a tenth of ``total``.
        log: where a line goes (default: this module's logger at INFO; ``print`` for a command-line tool).
    """

    def __init__(
        self, total: int, what: str, unit: str = "items", every: int | None = None, log: Callable | None = None
    ) -> None:
        self.total, self.what, self.unit = int(total), what, unit
        self.every = max(1, int(every) if every else -(-self.total // 10))
        self.log = log or logger.info
        self.done = 0
        self.start = time.perf_counter()

    def update(self, count: int = 1, note: str = "") -> None:
        """Count ``count`` more items done; log a line when one is due, ending with ``note`` if given."""
        before, self.done = self.done, self.done + count
        if self.done // self.every > before // self.every or (self.done >= self.total > before):
            self.log(self.line() + (f"; {note}" if note else ""))

    def line(self) -> str:
        """``<what>: <done> of <total> <unit>, <elapsed>[, about <left> left]``."""
        elapsed = time.perf_counter() - self.start
        line = f"{self.what}: {self.done} of {self.total} {self.unit}, {format_duration(elapsed)}"
        if 0 < self.done < self.total:
            line += f", about {format_duration(elapsed * (self.total - self.done) / self.done)} left"
        return line
