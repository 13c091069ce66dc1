"""Kernel launches, in one place, so the offline compile gate (``kop_triton.kernels.report``)
sees exactly what the launchers run.

Every launcher calls ``launch(kernel, grid, **kwargs)`` (keyword arguments only: kernel
parameters by name, plus ``num_warps`` / ``num_stages``).  Normally that is
``kernel[grid](**kwargs)``.  Inside ``recording(...)`` nothing runs: the call is appended to
the recorder (kernel, grid, arguments), so a launcher can be driven with meta or CPU tensors
of any shape -- T = 1M, D = 8192 -- on a machine without a GPU, and every specialisation it
would compile is known.  ``sm_count(device)`` is the one place a launcher asks how many SMs
the GPU has (the recorder answers for the target it models).
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
    def __init__(self, sms: int):
        self.sms = sms
        self.launches: List[Launch] = []


_RECORDER: Optional[Recorder] = None


@contextlib.contextmanager
def recording(sms: int = 132):
    """Record launches instead of running them; ``sm_count`` answers ``sms`` meanwhile
    (132: an H100 SXM / H200)."""
    global _RECORDER
    prev, _RECORDER = _RECORDER, Recorder(sms)
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


def launch(kernel, grid, **kwargs) -> None:
    grid = tuple(int(g) for g in grid)
    if _RECORDER is not None:
        _RECORDER.launches.append(Launch(kernel, grid, kwargs))
        return
    kernel[grid](**kwargs)
