"""Launch settings of every Triton kernel, in one table: tile sizes (channels per program BD,
contraction slices BK, key-channel slices BRS, rows per program BM / BT, ...), code-path switches
that trade registers for instructions (DIAG_LOOP), num_warps and num_stages.

    kernel_settings("_chunk_out_kernel", torch.bfloat16, R=16, D=1024, arch=90)
    -> {"BD": 64, "BK": 16, "num_warps": 8}

A launcher passes the result as keyword arguments (``launch(kernel, grid, ..., **settings)``).
The settings of a kernel start from its BASE entry and then every RULES entry that matches, in
order, overrides what it names.  Rules are keyed by what the choice depends on:

  triton  the Triton version range ``[from, before)`` (``TRITON``, parsed from
          ``triton.__version__``: "3.9.0", "3.6.0+git1a2b3c", "3.10.0rc1" all parse);
  arch    the target, 10 * major + minor of the compute capability, range ``[from, before)``
          (``launch.target_arch(device)``: the recorder answers for the target it models; None --
          the interpreter, or no CUDA device -- counts as sm_90, the lent GPU machine's);
  dtype   "fp32" | "16-bit" | "bf16" | "fp16", the input's;
  BR      R padded to a power of two >= 16 (the kernels' R block), range ``[lo, hi]``;
  when    exact values of a launcher's flags (e.g. ``dh0_only=True``).

Every rule carries the ptxas figures that chose it: the offline compile gate
(``python -m kop_triton.kernels.report``; registers and spills per thread) under each Triton
version gated -- 3.6 (pinned: the lent GPU machine's) and 3.9 (the newest release, gated in CI by
``make test`` in its own venv).  Triton versions between them (3.7, 3.8) are not gated: they take
the rules of their range below as written.  Nothing here is tuned by GPU timing yet.

Importing this module imports Triton only for its version string.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

Version = Tuple[int, int]


def parse_version(text: str) -> Version:
    """(major, minor) of a Triton version string: "3.9.0", "3.6.0+git1a2b3c", "3.10.0rc1",
    "3.4" -> (3, 9), (3, 6), (3, 10), (3, 4)."""
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(text))
    if m is None:
        raise ValueError(f"cannot read a Triton version from {text!r}: expected 'MAJOR.MINOR[...]' "
                         "such as '3.6.0'")
    return int(m.group(1)), int(m.group(2))


def _installed_triton() -> Version:
    try:
        import triton
    except ImportError:              # the table is still readable without Triton (nothing launches)
        return (0, 0)
    return parse_version(triton.__version__)


TRITON: Version = _installed_triton()
DEFAULT_ARCH = 90          # an unknown target (the interpreter, no CUDA device): as sm_90
ANY = (0, 10 ** 6)

# Tests: evaluate the table as for another Triton version / target (e.g. {"triton": (3, 9),
# "arch": 80}, under the interpreter, to run the tiles chosen for them), or force settings on every
# kernel that has them (e.g. {"BD": 16}).
AS_FOR: Dict[str, Any] = {}
FORCE: Dict[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a setting may depend on."""
    kernel: str
    dtype: str               # fp32 | bf16 | fp16
    R: int
    D: int
    K: int
    arch: int
    triton: Version
    flags: Dict[str, Any]

    @property
    def BR(self) -> int:
        return max(16, 1 << max(0, self.R - 1).bit_length())

    @property
    def fp32(self) -> bool:
        return self.dtype == "fp32"


Value = Union[int, bool, Callable[[Ctx], Union[int, bool]]]


@dataclasses.dataclass(frozen=True)
class Rule:
    kernels: Tuple[str, ...]
    set: Dict[str, Value]
    why: str                                  # the ptxas figures that chose it
    triton: Tuple[Version, Version] = ((0, 0), (10 ** 6, 0))
    arch: Tuple[int, int] = ANY
    dtype: Optional[str] = None               # fp32 | 16-bit | bf16 | fp16
    BR: Tuple[int, int] = ANY                 # inclusive
    when: Optional[Dict[str, Any]] = None

    def matches(self, c: Ctx) -> bool:
        if c.kernel not in self.kernels:
            return False
        if not (self.triton[0] <= c.triton < self.triton[1] and self.arch[0] <= c.arch < self.arch[1]):
            return False
        if self.dtype is not None and self.dtype != c.dtype and not (self.dtype == "16-bit" and not c.fp32):
            return False
        if not self.BR[0] <= c.BR <= self.BR[1]:
            return False
        return all(c.flags.get(k) == v for k, v in (self.when or {}).items())


def since(v: Version) -> Tuple[Version, Version]:
    return (v, (10 ** 6, 0))


def before(v: Version) -> Tuple[Version, Version]:
    return ((0, 0), v)


SM80 = (0, 90)             # Ampere / Ada (sm_80 .. sm_89) and older
SMALL_R = (0, 32)          # BR <= 32 (R <= 32)
BIG_R = (33, 10 ** 6)      # BR 64, 128
R32 = (32, 32)             # BR = 32 (R 17..32)


def _np2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def tile_d(c: Ctx) -> int:
    """Channels per program of the chunk tile kernels: D padded to a power of two, 16 to 64."""
    return min(64, max(16, _np2(c.D)))


# rows per program of the O(R)-per-token K2 kernels: (BM, BR) float32 tiles of <= 2048 elements
QK_TILE = 2048


def _block_m(c: Ctx) -> int:
    return max(16, min(64, QK_TILE // c.BR))


TILE_KERNELS = ("_chunk_state_kernel", "_chunk_out_kernel")

# The settings every kernel starts from, with the reasons that hold on every target and version.
BASE: Dict[str, Dict[str, Value]] = {
    # ---- scan (kernels/scan.py; the chunk plan the K2 mixer shares) ----
    # BD: channels per program; BK: every contraction in 16-wide slices (an fp32 IEEE dot runs on
    # CUDA cores, each thread holding its rows and columns of both operands over the whole
    # contraction: K = 64 spilled up to 15 KB per thread, gate 12-02, sm_90); 8 warps (at 4,
    # _chunk_out spilled 4 B on sm_80 at R <= 16, bf16, and up to 4 B at R = 64, gate 12-02)
    "_chunk_state_kernel": dict(BD=tile_d, BK=16, num_warps=8),
    "_chunk_out_kernel": dict(BD=tile_d, BK=16, num_warps=8),
    # BRS: key channels in 16-wide slices (whole (BT, R) tiles spilled 1.8 KB at R = 128; slices of
    # 32 still 4 B at R = 64 on sm_90 / sm_100, 16-bit, gate 12-02); DIAG_LOOP: the exact diagonal
    # sub-blocks one position at a time for R > 32, as (BC, BC, R) broadcasts below (they fit in
    # registers, and the interpreter runs them 4x faster)
    "_intra_A_kernel": dict(BRS=16, DIAG_LOOP=lambda c: c.BR > 32, num_warps=4),
    # BRS: key channels per step of its loops over R (whole (BT, R) fp32 tiles spilled 0.8 KB at
    # R = 128); BD: channels per step of its loops over D; 1 pipeline stage (its loads are consumed
    # at once; at the default 3 it spilled 4-20 B on sm_80 at R = 1, fp32, gate 12-02)
    "_bwd_dqk_kernel": dict(BRS=lambda c: min(c.BR, 32), BD=lambda c: min(tile_d(c), 16),
                            DIAG_LOOP=lambda c: c.BR > 32, num_warps=4, num_stages=1),
    # the state pass (its BLOCK and CB: kernels/scan.py): 8 warps (at 4, the flat-grid variant over
    # packed sequences spilled 12-24 B on sm_100 under 3.9; 8 warps: 0 B, <= 80 regs under 3.9 and 3.6,
    # all three targets; 2 warps: 0 B at up to 255 regs; gate 12-06)
    "_state_pass_kernel": dict(num_warps=8),
    # the grouped state pass's levels A (group totals: a (CB, BLOCK) fp32 accumulator; 4 warps: 0 B,
    # 47-56 regs) and C (a group's walk, the state pass's step; 8 warps as it: 0 B, 58-72 regs), under
    # 3.6 and 3.9, all three targets, flat grids and packed sequences included (gate 12-06)
    "_group_sum_kernel": dict(num_warps=4),
    "_group_apply_kernel": dict(num_warps=8),
    # ---- K2 (kernels/k2.py) ----
    # BM: rows per program, (BM, BR) float32 tiles of <= 2048 elements; BD: its (BD, BR) u and v
    # tiles stay <= 2048 elements (64 x 128 fp32 tiles spilled ~1.1 KB per thread on sm_80 / sm_90 /
    # sm_100, gate 12-02)
    "_k2_qk_kernel": dict(BM=_block_m, BD=lambda c: min(tile_d(c), max(16, QK_TILE // c.BR)), num_warps=8),
    # the projection folded into the forward chunk-state pass (R <= 32, a chunk of 64 rows a program):
    # BD as _k2_qk's for both its loops over D
    "_k2_qk_state_kernel": dict(BD=lambda c: min(tile_d(c), max(16, QK_TILE // c.BR)), num_warps=8),
    "_k2_dp_kernel": dict(BM=_block_m, num_warps=4),
    "_k2_out_kernel": dict(BD=tile_d, BK=16, BRS=16, DIAG_LOOP=lambda c: c.BR > 32, num_warps=8),
    # 16-bit, R <= 32: 32 channels (64: 8-100 B, gate 12-02), 8 warps; FUSE_DUV: [du | dv] = x^T dp
    # summed in the kernel (R <= 32, when its weight-gradient sums are fused at all: k2.py), else one
    # matrix product after it (one more read of x)
    "_k2_dx_kernel": dict(BD=lambda c: min(tile_d(c), 32), BK=16, BRS=16, DIAG_LOOP=lambda c: c.BR > 32,
                          FUSE_DUV=True, num_warps=8),
    # ---- conv (kernels/conv.py) ----
    # BT = BS = 64 feeds the tensor cores with 64 x 64 x BD products, BD <= 64 keeps a fp32 (BT, BD)
    # accumulator at 32 registers per thread with 4 warps (first choices by that arithmetic, not
    # measured on a GPU); 8 warps (at 4, the (BT, BD) fp32 tiles spilled 4-12 B on sm_80 / sm_100;
    # dw, whose two (BT, BD) fp32 tiles live per lag, 16 B at BL = 8, BD = 64, sm_90; gate 12-02);
    # BL: lags per program of dw
    "_conv_fwd_kernel": dict(BT=64, BS=64, BD=tile_d, num_warps=8),
    "_conv_bwd_dx_kernel": dict(BT=64, BS=64, BD=tile_d, num_warps=8),
    "_conv_bwd_dw_kernel": dict(BT=64, BL=lambda c: min(32, _np2(c.K)), BD=tile_d, num_warps=8),
}

# Exceptions to BASE, applied in order (a later match overrides an earlier one).  "gate 12-02":
# the compile report of 2026-12-02 (Triton 3.6); "gate 12-06": the gate runs of 2026-12-06 under
# Triton 3.6.0 and 3.9.0 (ci workload, sm_80 / sm_90 / sm_100; registers and spills per thread
# from ptxas as each Triton version runs it), which also tried the alternatives named.
RULES: Tuple[Rule, ...] = (
    # ---- scan ----
    Rule(TILE_KERNELS, dict(BD=lambda c: min(tile_d(c), 32), num_stages=1), dtype="fp32", BR=BIG_R,
         why="fp32, R = 128, 64 channels and 3 stages (the default) spilled under 3.9: _chunk_state 4 B on "
             "sm_90 (D = 24), _chunk_out reversed 8 B on sm_90 and 4 B on sm_100; 2 stages then spilled "
             "4-16 B in the flat-grid variants (sm_80, sm_90), 1 stage 16 B in one (_chunk_out, sm_80; "
             "_chunk_state under 3.6); 32 channels and 1 stage: 0 B, <= 80 regs under 3.9 and 3.6 on all "
             "three targets, flat grids included (gate 12-06)"),
    Rule(("_chunk_out_kernel",), dict(num_warps=4), dtype="fp32", BR=(16, 16), triton=since((3, 9)),
         arch=(90, 100),
         why="fp32, R <= 16 under 3.9 on sm_90: 8 warps spilled 8 B at 80 registers (scan T = 1M, D = 1024, "
             "BD = 64; gate 12-06, make test); 4 warps: 137 registers, 0 B; BD = 32 also 0 B (64 registers) "
             "but twice the A-tile reads"),
    Rule(("_intra_A_kernel", "_bwd_dqk_kernel"), dict(num_warps=8), dtype="fp32",
         why="fp32: 8 warps (at 4, _bwd_dqk spilled 64 B at R <= 16, gate 12-02)"),
    Rule(("_intra_A_kernel", "_bwd_dqk_kernel"), dict(num_warps=8), BR=BIG_R, why="R > 32: 8 warps (gate 12-02)"),
    Rule(("_bwd_dqk_kernel",), dict(num_stages=2), dtype="fp32", BR=BIG_R,
         why="fp32, R = 128: 1 stage spilled 8-16 B in the flat-grid variants under 3.9 (sm_90 packed, "
             "sm_100); 2 stages: 0 B, <= 176 regs under 3.9, <= 182 under 3.6, all three targets; 32 "
             "channels per step instead: 16-32 B at D = 24 (sm_80, sm_100) (gate 12-06)"),
    Rule(("_bwd_dqk_kernel",), dict(BRS=16), dtype="fp32", BR=BIG_R,
         why="fp32, R > 32: 16-wide key-channel slices (32-wide spilled 20 B on sm_90 / sm_100, gate 12-02)"),
    Rule(("_bwd_dqk_kernel",), dict(BD=lambda c: min(tile_d(c), 32)), dtype="bf16",
         why="bf16: 32 channels per step of the loops over D (16 for fp16 / fp32; gate 12-02)"),
    Rule(("_bwd_dqk_kernel",), dict(DIAG_LOOP=True), triton=since((3, 9)), dtype="16-bit", BR=SMALL_R,
         why="3.9, 16-bit, R <= 32: the diagonal sub-block as (BC, BC, R) broadcasts spilled 8-12 B on "
             "sm_90 (bf16 / fp16, packed sequences; 4 warps, 255 regs); one position at a time: 0 B, "
             "135-255 regs on sm_80 / sm_90 / sm_100; 8 warps instead still 4 B (bf16, sm_90), 16 "
             "channels per step 12 B (gate 12-06).  Under 3.6 the broadcasts spill nothing"),
    Rule(("_bwd_dqk_kernel",), dict(num_stages=lambda c: 2 if c.D % 16 == 0 else 1), dtype="16-bit",
         why="16-bit, D a multiple of 16: 2 stages pipeline the loads of its loops over D (cp.async in the PTX; "
             "none at 1 stage) at the same occupancy: 0 B, 168-255 regs under 3.6 and 128-255 under 3.9, all "
             "three targets, flat grids included (bf16, R = 16, D = 1024, sm_90, 3.6: 251 regs, 16 cp.async, "
             "2 CTAs = 8 warps per SM, as at 1 stage with 253).  D = 24 (no 16-wide vector loads): 2 stages "
             "spilled 24 B under 3.6 and 16-40 B under 3.9 (sm_90, sm_100).  Not reachable: 16 warps per SM (16 "
             "warps per program spilled 112 B; 8 warps: 220-227 regs, still 8 warps per SM) (gate 12-06)"),
    # ---- K2 ----
    Rule(("_k2_out_kernel",), dict(maxnreg=64), dtype="bf16", BR=(16, 16), when=dict(plain=True),
         triton=before((3, 9)),
         why="before 3.9, bf16, R <= 16, R and D multiples of 16, a shared kernel, no conv state, no packed "
             "sequences (plain): capped at 64 "
             "regs (maxnreg; unconstrained ptxas takes 99 at 8 warps: 2 programs per SM), 4 programs of 8 warps "
             "per SM, twice the loads in flight; 0 B under 3.6 on sm_80 / sm_90 / sm_100 (D = 256-8192).  Under "
             "3.9 capped at 64: 132-148 B (sm_90 / sm_100), at 80: 68-72 B, at 96: 0 B but still 2 programs per "
             "SM: no cap there.  Capped elsewhere it "
             "spilled 16-188 B under 3.6 (fp16, R = 4, D = 24, per-channel kernels: 28-40 B even plain); 4 warps capped at 96 or 80: 24-28 B; 16 warps at 64: 80 B (gate 12-06)"),
    Rule(("_k2_out_kernel",), dict(BD=16, num_warps=4), dtype="16-bit", BR=BIG_R,
         why="R > 32, 16-bit: 16 channels, 4 warps (32 channels: 8 B; 8 warps: 12-16 B; gate 12-02)"),
    Rule(("_k2_out_kernel",), dict(BD=16, num_warps=8), dtype="fp32", BR=BIG_R,
         why="R > 32, fp32: 16 channels, 8 warps (32 channels: 8 B; 4 warps: 12-16 B; gate 12-02)"),
    Rule(("_k2_out_kernel",), dict(BD=lambda c: min(tile_d(c), 32)), dtype="fp32", BR=SMALL_R,
         why="fp32, R <= 32: 64 channels spilled 4 B under 3.9 on sm_90 and sm_100 with initial states "
             "(8 warps, 128 regs; 2 or 1 stages the same, 4 warps 4 B on sm_100 per-channel); 32 "
             "channels: 0 B, <= 118 regs under 3.9 and <= 128 under 3.6 on all three targets (gate 12-06)"),
    Rule(("_k2_qk_state_kernel",), dict(BD=lambda c: min(tile_d(c), 32)), dtype="fp32",
         why="fp32: the state product (BR, 64) x (64, BD) on CUDA cores; 64 channels spilled 12 B on sm_90 "
             "(packed sequences, R = 16, Triton 3.6; gate 12-06)"),
    Rule(("_k2_dx_kernel",), dict(BD=16, BK=32), dtype="16-bit", BR=BIG_R,
         why="R > 32, 16-bit: 16 channels (32: 8-100 B), 32-wide R slices (16-wide: 8 B; 2 or 4 "
             "warps: 56 B) (gate 12-02)"),
    Rule(("_k2_dx_kernel",), dict(BK=16, num_warps=4, num_stages=2), arch=SM80, dtype="16-bit", BR=BIG_R,
         why="sm_80, R = 128, 16-bit, 32-wide R slices and 8 warps: 36-64 B under 3.9 (bf16, fp16); with 4 "
             "warps and 2 stages still 12-52 B in the flat-grid variant (bf16, 3.9 and 3.6); 16-wide slices, "
             "4 warps, 2 stages: 0 B, <= 230 regs under 3.9 and 3.6, flat grids included (8 warps and 2 "
             "stages: 32-120 B) (gate 12-06)"),
    Rule(("_k2_dx_kernel",), dict(num_warps=4, maxnreg=168, FUSE_DUV=False), dtype="bf16", BR=(16, 16),
         arch=(90, 10 ** 6), when=dict(plain=True),
         why="bf16, R <= 16, sm_90 / sm_100, R and D multiples of 16, no conv states, no packed sequences "
             "(plain): 3 programs of 4 warps per SM instead of 1 of 8 (3x the loads in flight), capped at 168 "
             "regs (maxnreg), [du | dv] = x^T dp after the kernel (FUSE_DUV off): 0 B, 157-167 regs under 3.6 "
             "and 3.9 (D = 64-8192, K = 1-64, shared and per-channel kernels).  Unconstrained ptxas takes "
             "203-233 regs whatever the code (8 or 4 warps, fused or not; 1-2 programs per SM).  Capped, the "
             "fused x^T dp sums spill (4 warps at 168: 36 B; 8 warps at 128: 44-64 B), and so does the rest "
             "elsewhere: 8-40 B under 3.6 at fp16 (its fp32 state products), R = 32, R or D not a multiple of 16 "
             "(D = 24, R = 4), conv states, packed sequences; 4 warps uncapped there too (ptxas settles at 168 "
             "and spills 8-16 B); sm_80 8 B (gate 12-06)"),
    Rule(("_k2_dx_kernel",), dict(BD=16, BK=16, num_warps=4), dtype="fp32",
         why="fp32 on CUDA cores: 16 channels, 4 warps (32 channels spilled on sm_90; 8 warps 4-12 B; "
             "gate 12-02)"),
    Rule(("_k2_dx_kernel",), dict(num_warps=8), dtype="fp32", BR=BIG_R, why="fp32, R > 32: 8 warps (gate 12-02)"),
    Rule(("_k2_dx_kernel",), dict(BD=32), triton=before((3, 9)), arch=SM80, dtype="fp32", BR=SMALL_R,
         why="sm_80, fp32, R <= 32, before 3.9: 32 channels (16 spilled 8 B under 3.6; gate 12-02, "
             "12-06).  Under 3.9 the other way round: 32 channels spilled 4 B (D = 24), 16 channels "
             "0 B, 168 regs (gate 12-06)"),
    # ---- R = 32 (BR = 32, R 17..32: the largest small-R tiles).  Not gated before 12-06 (the sets
    # had R = 4, 16 and 128); gate._edge_cases found these spills, all with the BASE / small-R
    # settings, and the alternatives below (gate 12-06, Triton 3.6 and 3.9, sm_80 / 90 / 100) ----
    Rule(("_bwd_dqk_kernel",), dict(BRS=16), dtype="fp32", BR=R32,
         why="fp32, R = 32: 32-wide key-channel slices spilled 64 B (sm_80) to 544 B (sm_90) under 3.6 and "
             "60-380 B under 3.9 (scan and K2, plain and packed); 16-wide slices, as R > 32 has: 0 B; gate 12-06"),
    Rule(("_bwd_dqk_kernel",), dict(num_warps=8), dtype="16-bit", BR=R32,
         why="16-bit, R = 32: 4 warps spilled 16-100 B under 3.6 (bf16 / fp16, sm_80 / 90 / 100, K2 plain and "
             "packed); 8 warps: 0 B, <= 255 regs (one CTA of 8 warps per SM, as 2 CTAs of 4 had); 16-wide "
             "slices instead: 164-400 B, 16 channels: 4-100 B; gate 12-06"),
    Rule(("_bwd_dqk_kernel",), dict(BD=lambda c: 16 if c.D % 16 else min(tile_d(c), 32)), triton=since((3, 9)),
         dtype="bf16",
         why="3.9, bf16, D not a multiple of 16 (1 stage): 32 channels per step spilled 76 B (sm_90) and 64 B "
             "(sm_100) on packed sequences at R = 16, D = 24; 16 channels: 0 B, 174 regs (8 warps: 0 B, 224 "
             "regs; no diagonal loop: still 4-8 B); gate 12-06"),
    Rule(("_k2_qk_kernel",), dict(BD=16), dtype="fp32", BR=R32,
         why="fp32, R = 32: a (64, 64) x (64, 32) CUDA-core product spilled 3.2-3.5 KB under 3.6 and 3.9 (D = "
             "1024); 16 channels a step: 0 B; gate 12-06"),
    Rule(("_k2_out_kernel",), dict(BD=16, DIAG_LOOP=True), dtype="fp32", BR=R32,
         why="fp32, R = 32: 32 channels spilled 8-40 B on sm_80 / 90 / 100 under 3.6; 16 channels still 8 B "
             "(also with 4 warps or 1 stage); 16 channels with the diagonal sub-blocks one position at a time: "
             "0 B, <= 173 regs; gate 12-06"),
    Rule(("_k2_dx_kernel",), dict(num_warps=8, DIAG_LOOP=True), dtype="fp32", BR=R32,
         why="fp32, R = 32: 4 warps (the fp32 rule) spilled 8-12 B on sm_90 / sm_100 under 3.6, 8 warps too; "
             "8 warps with the diagonal loop: 0 B, <= 222 regs; gate 12-06"),
    Rule(("_k2_dx_kernel",), dict(BD=16), dtype="16-bit", BR=R32,
         why="16-bit, R = 32: 32 channels spilled 16 B on sm_90 under 3.6 (fp16, packed, the fused weight "
             "gradients); 16 channels: 0 B; gate 12-06"),
    Rule(("_chunk_out_kernel",), dict(num_stages=1), triton=since((3, 9)), arch=SM80, BR=R32,
         why="3.9, sm_80, R = 32: the reversed pass spilled 4-16 B at 3 stages (fp32, fp16; scan, plain and "
             "packed); 1 stage: 0 B; gate 12-06"),
    # ---- conv ----
    Rule(("_conv_bwd_dx_kernel",), dict(BD=lambda c: min(tile_d(c), 32), num_stages=1), dtype="fp32",
         when=dict(use_dot=True),
         why="fp32 Toeplitz product, 64 channels: the flat-grid variant spilled 16 B on sm_90 and 28 B on "
             "sm_100 under 3.9; 1 stage alone: 8 B under 3.6 (sm_100); 32 channels and 1 stage: 0 B, <= 128 "
             "regs under 3.9 and 3.6 (16-row source blocks also 0 B, but they regroup the sums) (gate 12-06)"),
    Rule(("_conv_bwd_dx_kernel",), dict(BT=lambda c: max(16, min(64, _np2(c.K - 1)))),
         when=dict(dh0_only=True, use_dot=False),
         why="only the K - 1 initial-state rows of each sequence: a tile of their size (the (64, BD) "
             "tile of this variant spilled 16 B on sm_80, fp32; gate 12-02); 64 rows for the Toeplitz product"),
)


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        if dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {dtype!r}")
        return dtype
    # float64 inputs (the conv's Triton path takes them) run the fp32 IEEE code, as float32
    names = {torch.float32: "fp32", torch.float64: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names:
        raise ValueError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {dtype}")
    return names[dtype]


def kernel_settings(kernel: str, dtype, *, R: int = 1, D: int = 1, K: int = 1, arch: Optional[int] = None,
                    **flags) -> Dict[str, Any]:
    """The launch settings of ``kernel`` for inputs of ``dtype`` (torch dtype or fp32 / bf16 /
    fp16), R, D, K, the target ``arch`` (``launch.target_arch``; None: sm_90) and the
    launcher's ``flags`` -> keyword arguments for ``launch``."""
    if kernel not in BASE:
        raise ValueError(f"no launch settings for kernel {kernel!r}; known: {sorted(BASE)}")
    c = Ctx(kernel, _dtype_name(dtype), int(R), int(D), int(K),
            int(AS_FOR.get("arch", arch if arch is not None else DEFAULT_ARCH)),
            tuple(AS_FOR.get("triton", TRITON)), flags)
    vals: Dict[str, Value] = dict(BASE[kernel])
    for rule in RULES:
        if rule.matches(c):
            vals.update(rule.set)
    out = {k: (v(c) if callable(v) else v) for k, v in vals.items()}
    out.update({k: v for k, v in FORCE.items() if k in out})
    return out



# --------------------------------------------------------------------------------------
# per-op tunables: ScanSettings, ConvSettings, K2Settings
# --------------------------------------------------------------------------------------
#
# What a launcher chooses beyond one kernel's tiles: how the state pass composes chunks, when it
# splits into groups, when the conv switches to its Toeplitz product, what the fused K2 backward
# sums inside its dx kernel and how many chunks one dx program walks.  One frozen object per op,
# passed in (``settings=`` on the launchers, the autograd Functions and the public ops); its
# default instance (SCAN, CONV, K2) is what every call without one runs.  Every field says the
# measurement or the reasoning that chose its default.  A test forces a path with
# ``dataclasses.replace(SCAN, pass_group=3)``; fields are checked when the object is built (a
# ValueError naming the field, the value and the allowed range).  Only the defaults are compile-
# gated (kernels/report.py): other values of the fields that reach a kernel as a constexpr
# (pass_block, pass_chunks; the fused weight-gradient sums) compile other specialisations.


def _check_field(owner: str, name: str, value, low: int, high: Optional[int] = None, pow2: bool = False,
                 optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and \
        (high is None or value <= high) and (not pow2 or value & (value - 1) == 0)
    if not ok:
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        what = f"a power of two in {rng}" if pow2 else f"an int {rng}" if high is None else f"an int in {rng}"
        raise ValueError(f"{owner}.{name} must be {what}{' or None' if optional else ''}, got {value!r}")


def _check_flag(owner: str, name: str, value) -> None:
    """A forcing switch: None (by the launcher's rule), True or False."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be None, True or False, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ScanSettings:
    """The chunked scan's state pass (kernels/scan.py ``ChunkPlan.state_pass``, ``pass_group``);
    the fused K2 mixer runs the same pass (``K2Settings.scan``)."""

    # flat (R*D) elements per program of the pass: a small block gives more programs at B = 1 (the
    # pass is the only walk over a sequence; its programs are its parallelism); not yet tuned on a
    # GPU.  A constexpr (BLOCK): 128 is what the compile gate checked (8 warps, 0 B spilled, gate 12-06)
    pass_block: int = 128
    # chunks composed per dependent step (CB; the steps are ceil(chunks / pass_chunks)): a step's 16
    # rows of pass_block fp32 (8 KB) are loaded independently of the running state, so one program
    # keeps them in flight together (an estimate of latency hiding, not measured on a GPU; the
    # compile gate checked 16: 0 B spilled)
    pass_chunks: int = 16
    # past pass_max_steps dependent steps (a sequence of over pass_chunks * pass_max_steps = 128
    # chunks, 8K tokens) on fewer than pass_level_programs programs (N * ceil(R*D / pass_block)) the
    # pass runs in three levels over groups of G ~ sqrt(chunks) chunks (``pass_group``): the levels
    # read the chunk states once more (1.5x the bytes), which pays only while the single pass is
    # bound by its steps: each program has one step's 8 KB in flight per ~1 us step (an estimate),
    # 256 programs ~2 TB/s, about 1.5x below an H100's ~3 TB/s -- the break-even (estimates from
    # those figures, not measured on a GPU)
    pass_max_steps: int = 8
    pass_level_programs: int = 256
    # chunks per group of the grouped pass, forced (tests: groups on tiny inputs); 0: one level;
    # None: by the rule above
    pass_group: Optional[int] = None

    def __post_init__(self):
        _check_field("ScanSettings", "pass_block", self.pass_block, 16, 1024, pow2=True)
        _check_field("ScanSettings", "pass_chunks", self.pass_chunks, 1, 128, pow2=True)
        _check_field("ScanSettings", "pass_max_steps", self.pass_max_steps, 1)
        _check_field("ScanSettings", "pass_level_programs", self.pass_level_programs, 1)
        _check_field("ScanSettings", "pass_group", self.pass_group, 0, optional=True)


@dataclasses.dataclass(frozen=True)
class ConvSettings:
    """The causal conv's launchers (kernels/conv.py); the fused K2 mixer's conv tiles too."""

    # shared kernels with more taps than this use the Toeplitz product on tensor cores (the taps
    # loop costs a shifted tile load per tap; the product 2 * (K + BT) flops per output): a first
    # choice by that arithmetic, not yet measured on a GPU.  0: always the product (shared kernels);
    # a huge value: always the taps loop
    dot_min_taps: int = 32
    # at most this many programs of the weight-gradient kernel (_conv_bwd_dw_kernel's time splits
    # NS = min(blocks, dw_programs // (lag blocks x channel blocks))): ~4 waves of 132 SMs (an
    # H100 SXM / H200); a function of shapes only, so its fixed-order sums stay fixed
    dw_programs: int = 512

    def __post_init__(self):
        _check_field("ConvSettings", "dot_min_taps", self.dot_min_taps, 0)
        _check_field("ConvSettings", "dw_programs", self.dw_programs, 1)


SCAN = ScanSettings()
CONV = ConvSettings()


@dataclasses.dataclass(frozen=True)
class K2Settings:
    """The fused K2 mixer's launchers (kernels/k2.py ``k2_fwd`` / ``k2_bwd``), with the scan's and
    the conv's settings it runs."""

    # _k2_dx_kernel sums [du | dv] = x^T dp in two (BD, BR) fp32 accumulators for BR <= max_fused_r
    # (R <= 32) and the conv's weight gradient for kernels of up to max_fused_taps taps; beyond, a
    # matrix product and conv_bwd_dw (one more pass over x; over x and dy).  The limits the compile
    # gate checked at 0 B spilled (16-bit; R = 128 left no registers for them, gate 12-02)
    max_fused_r: int = 32
    max_fused_taps: int = 64
    # None: the fused sums for 16-bit inputs only (fp32's CUDA-core products leave no registers for
    # them, gate 12-02); True / False: forced (tests check the fused sums at fp32 precision)
    fuse_weight_grads: Optional[bool] = None
    # chunks per _k2_dx_kernel program: max(1, min(max_dx_group, chunks x channel blocks //
    # dx_target_programs)) -- enough programs to fill a GPU several times over (1024 ~ 8 waves of
    # 132 SMs), the partial sums it writes shrinking with the group; a function of shapes only, so
    # every reduction's order is fixed; not yet tuned on a GPU
    dx_target_programs: int = 1024
    max_dx_group: int = 32
    # forced chunks per dx program (tests: groups on tiny inputs); None: by the rule above
    dx_group: Optional[int] = None
    # the forward folds the q/k projection into the chunk-state pass (``_k2_qk_state_kernel``: x
    # leaves DRAM once there instead of twice) for R <= 32 (64 x BR <= QK_TILE) from fold_min_chunks chunks on:
    # the fold does a chunk's state work in the chunk's one program, which the separate chunk-state
    # pass spreads over D / 64 programs, so below about one chunk per SM (132 on an H100 SXM /
    # H200) the separate passes fill the GPU better (an estimate; the model, benchmarks/perf_model.py,
    # prices both: at T = 1M, bf16, R = 16 fwd 27% -> 31% of the copy bound at D = 1024)
    fold_min_chunks: int = 132
    # True / False: the fold forced on (R <= 32) or off (tests); None: by the rule above
    fold_qk: Optional[bool] = None
    scan: ScanSettings = SCAN
    conv: ConvSettings = CONV

    def __post_init__(self):
        _check_field("K2Settings", "max_fused_r", self.max_fused_r, 0, 128)
        _check_field("K2Settings", "max_fused_taps", self.max_fused_taps, 0, 4096)
        _check_flag("K2Settings", "fuse_weight_grads", self.fuse_weight_grads)
        _check_field("K2Settings", "dx_target_programs", self.dx_target_programs, 1)
        _check_field("K2Settings", "max_dx_group", self.max_dx_group, 1)
        _check_field("K2Settings", "dx_group", self.dx_group, 1, optional=True)
        _check_field("K2Settings", "fold_min_chunks", self.fold_min_chunks, 1)
        _check_flag("K2Settings", "fold_qk", self.fold_qk)
        for name, cls in (("scan", ScanSettings), ("conv", ConvSettings)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"K2Settings.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")


K2 = K2Settings()


def op_settings(settings, cls, default):
    """``settings`` if it is a ``cls``, ``default`` for None; else a TypeError naming the class wanted."""
    if settings is None:
        return default
    if not isinstance(settings, cls):
        raise TypeError(f"settings must be a kop_triton.kernels.settings.{cls.__name__} (or None: the defaults), "
                        f"got {type(settings).__name__} {settings!r}")
    return settings
