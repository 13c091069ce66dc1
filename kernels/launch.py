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

Grids: CUDA allows at most 2^31 - 1 programs on grid axis x and 65,535 on axes y and z (CUDA C
Programming Guide, "Technical Specifications per Compute Capability": maximum x-, y-, z-dimension
of a grid of thread blocks); the Triton interpreter has no limit.  So a launch whose
natural grid would pass 65,535 programs on y or z (a sequence of over 4M tokens, B > 65,535, ...)
runs on a flat grid instead, all of it on axis x (``grid_of``: the kernel's FLAT constexpr then
decodes its indices with ``_common.tile_ids`` or ``varlen.chunk_tile``, the blocks that share a
chunk's rows still back to back); below that size the natural grid runs, whose compiled code the
compile gate tuned to zero spills (the decode's divisions, always on, moved ptxas's register
choices: 4-40 B of spills in 8 specialisations, compile gate 2026-12-06).  ``launch`` checks every grid against those limits, recorded launches included, and names
the kernel and the grid when one is over, instead of the driver's "invalid argument".
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch


# CUDA's grid limits per axis (x, y, z)
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


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


def flat(*sizes: int) -> Tuple[int]:
    """The one-dimensional grid of a (N0, N1, ...) grid of programs (N0 fastest)."""
    n = 1
    for s in sizes:
        n *= int(s)
    return (n,)


# tests set this to run every kernel on its flat grid (FLAT=True) at any size
FORCE_FLAT = False


def grid_of(natural, flat_sizes=None) -> Tuple[Tuple[int, ...], bool]:
    """(grid, FLAT) of a launch: its ``natural`` (x, y, z) grid when CUDA takes it (y and z within
    65,535 programs), the kernels' compiled code as tuned by the compile gate; else (or with
    FORCE_FLAT) all of it on axis x, ``flat(*flat_sizes)`` (default: the natural sizes, axis 0
    fastest), which the kernel decodes when its FLAT constexpr is set."""
    natural = tuple(int(g) for g in natural)
    if not FORCE_FLAT and all(g <= GRID_LIMITS[1] for g in natural[1:]):
        return natural, False
    return flat(*(natural if flat_sizes is None else flat_sizes)), True


def check_grid(name: str, grid: Tuple[int, ...]) -> None:
    """Raise a ValueError naming the kernel and the grid when ``grid`` is not a valid CUDA grid."""
    if not 1 <= len(grid) <= 3 or any(g < 0 for g in grid):
        raise ValueError(f"{name}: grid {grid} is not a CUDA grid (1 to 3 non-negative sizes); "
                         "this is a bug in kop-triton's launcher, please report it")
    for axis, (g, lim) in enumerate(zip(grid, GRID_LIMITS)):
        if g > lim:
            raise ValueError(
                f"{name}: grid {grid} has {g:,} programs on axis {'xyz'[axis]}, over CUDA's limit of "
                f"{lim:,} (x: 2^31 - 1, y and z: 65,535); the input is too large for one launch: split "
                "the batch or the sequence into smaller calls (carry the state with initial_state / "
                "output_final_state)")


def launch(kernel, grid, **kwargs) -> None:
    grid = tuple(int(g) for g in grid)
    check_grid(getattr(kernel, "__name__", str(kernel)), grid)
    if _RECORDER is not None:
        _RECORDER.launches.append(Launch(kernel, grid, kwargs))
        return
    kernel[grid](**kwargs)
