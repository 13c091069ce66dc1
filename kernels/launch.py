"""Kernel launches, in one place, so the offline compile gate (``kop_triton.kernels.report``)
sees exactly what the launchers run.

Every launcher calls ``launch(kernel, grid, **kwargs)`` (keyword arguments only: kernel
parameters by name, plus ``num_warps`` / ``num_stages``).  Normally that is
``kernel[grid](**kwargs)``.  Inside ``recording(...)`` nothing runs: the call is appended to
the recorder (kernel, grid, arguments), so a launcher can be driven with meta or CPU tensors
of any shape -- T = 1M, D = 8192 -- on a machine without a GPU, and every specialisation it
would compile is known.  ``sm_count(device)`` and ``target_arch(device)`` are the one place a
launcher asks how many SMs the GPU has and which architecture it is (the recorder answers for
the target it models).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch


@dataclasses.dataclass
class Launch:
    kernel: Any                       # the @triton.jit function
    grid: Tuple[int, ...]
    kwargs: Dict[str, Any]            # kernel arguments by name, num_warps / num_stages included

    @property
    def name(self) -> str:
        return self.kernel.__name__


class Recorder:
    def __init__(self, sms: int, arch: Optional[int]):
        self.sms = sms
        self.arch = arch
        self.launches: List[Launch] = []


_RECORDER: Optional[Recorder] = None


@contextlib.contextmanager
def recording(sms: int = 132, arch: Optional[int] = None):
    """Record launches instead of running them; meanwhile ``sm_count`` answers ``sms`` (132: an
    H100 SXM / H200) and ``target_arch`` answers ``arch`` (e.g. 90 for sm_90; None: unknown)."""
    global _RECORDER
    prev, _RECORDER = _RECORDER, Recorder(sms, arch)
    try:
        yield _RECORDER
    finally:
        _RECORDER = prev


def is_recording() -> bool:
    return _RECORDER is not None


def sm_count(device: torch.device) -> Optional[int]:
    """SMs of the GPU that will run the kernels (None off CUDA, outside a recording)."""
    if _RECORDER is not None:
        return _RECORDER.sms
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def target_arch(device: torch.device) -> Optional[int]:
    """Compute capability of the GPU that will run the kernels as 10 * major + minor (80, 90, 100),
    for launch settings chosen per target; None off CUDA (the interpreter), outside a recording."""
    if _RECORDER is not None:
        return _RECORDER.arch
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


def launch(kernel, grid, **kwargs) -> None:
    grid = tuple(int(g) for g in grid)
    if _RECORDER is not None:
        _RECORDER.launches.append(Launch(kernel, grid, kwargs))
        return
    kernel[grid](**kwargs)
