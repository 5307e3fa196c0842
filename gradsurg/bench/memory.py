"""Peak memory of one benchmark run, above the level at its start.

The runner excludes the evaluation passes and the conflict probe (:meth:`PeakMemory.excluded`), so
the number reflects training: the model's LoRA weights and heads, optimizer state, activations and
whatever the method adds (e.g. the Surgeon's per-task gradients).

What is measured depends on the device (the report names it):

* **CUDA** — ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``, minus
  the memory allocated when the run starts: the tensors the run itself creates (LoRA weights, task
  heads, optimizer state, activations, per-task gradients), not the caching allocator's reserve.
* **CPU on Linux** — the growth of the process's peak resident set size: the kernel's high-water
  mark ``VmHWM`` is reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs`` after a
  garbage collection and ``malloc_trim`` (which hand freed memory back to the OS), and the run's peak
  is ``VmHWM − RSS at start``. It counts everything the process touches (allocator slack and
  fragmentation included), so only differences well above a few MB are meaningful.
* **Elsewhere** — nothing (``None``; the report prints ``n/a``). ``tracemalloc`` does not see
  PyTorch's allocations and is not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import pathlib
from collections.abc import Callable, Iterator
from types import TracebackType

import torch

__all__ = ["PeakMemory"]

_STATUS = pathlib.Path("/proc/self/status")
_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")


class PeakMemory:
    """Context manager measuring the peak memory of its body above the level at entry.

    Parts of the body wrapped in :meth:`excluded` (e.g. evaluation passes) do not count: the peak
    is tracked per segment between them, and the high-water mark is reset after each.

    Attributes:
        kind: ``"cuda_allocated"``, ``"cpu_peak_rss"`` or ``"unavailable"``.
        peak_bytes: The peak in bytes once the body has run, or ``None`` when unavailable.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "unavailable"
        self.peak_bytes: int | None = None
        self._base = 0
        self._peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_allocated"
        elif _reset_peak_rss():
            self._base = _status_kib("VmRSS") * 1024
            self.kind = "cpu_peak_rss"
        return self

    def _segment_peak(self) -> int:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.kind == "cpu_peak_rss":
            return _status_kib("VmHWM") * 1024 - self._base
        return 0

    def _reset(self) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss":
            _reset_peak_rss()

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """A part of the body whose memory does not count towards the peak."""
        self._peak = max(self._peak, self._segment_peak())
        try:
            yield
        finally:
            self._reset()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.kind != "unavailable":
            self.peak_bytes = max(0, self._peak, self._segment_peak())


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (hands freed heap memory back to the OS), or ``None`` without glibc."""
    try:
        function: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return function


def _reset_peak_rss() -> bool:
    """Trim the heap and reset the kernel's RSS high-water mark; ``False`` where that is not possible."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except (OSError, ValueError):
        return False
    return True


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (raises ``ValueError`` when absent)."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no field {field!r}.")
