"""A model (not a measurement) of the memory traffic and the parallelism of each K2 path.

For every launch of a path: bytes per token it moves to or from memory, from the kernel's own
loads and stores (a tile a program loads is counted once per program; tiles that programs
launched back to back share, and what one program loads a second time, are listed as
``cached`` -- L1/L2 hits when the model's assumption holds -- and not counted), split into

  act     D-wide activations: x, y, dy, dx and every D-wide temporary (``passes`` = act / (D s));
  small   O(R) (or O(chunk)) per token: q, k, their gradients, the scores A of the unfused scan;
  states  the float32 chunk states, R * D * 4 bytes per chunk;

and the grid size of the launch (programs; 0 for PyTorch / cuBLAS ops).  Paths:

  fused      ``k2_mixer(backend="triton")``, ``kernels/k2.py``: chunk-parallel forward and backward;
  old_fused  the fused kernel it replaced (commit e1fc1ef): one program per (sequence, channel
             block) walking its sequence in 16-token steps and projecting all of D in every
             channel block; its backward unfused (PyTorch q, k; the scan and conv backward
             kernels; a PyTorch chain with float32 temporaries);
  unfused    ``k2_mixer(backend="triton_unfused")``: PyTorch q, k, the Triton scan and conv, a
             PyTorch gate-and-add, differentiated by autograd;
  chunked    the chunked PyTorch path (``ops/k2_chunked.py``, float32, chunks of 16): its tensor
             ops, each reading its operands and writing its result once.

``s`` is x's element size.  The copy bound of the op is 2 passes forward (read x, write y) and
3 backward (read x and dy, write dx).

    python -m benchmarks.traffic                      # the README's table on stderr, JSON on stdout
    python -m benchmarks.traffic --D 64,256,1024 --T 2048,65536,1048576 --json traffic.json
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Callable, Dict, List

from kop_triton.kernels.config import CHUNK, SUB_CHUNK as SUB       # neither imports Triton
from kop_triton.kernels.settings import CONV, K2, QK_TILE, SCAN

F32 = 4
SMS_H200 = 132
# the launchers' own tunables, read from their default settings (kernels/settings.py)
MAX_FUSED_R, MAX_FUSED_TAPS, DX_TARGET, MAX_GROUP = K2.max_fused_r, K2.max_fused_taps, K2.dx_target_programs, \
    K2.max_dx_group
FOLD_MIN_CHUNKS = K2.fold_min_chunks                                     # kernels/k2.py fold_qk
PASS_BLOCK, PASS_CHUNKS, PASS_MAX_STEPS, PASS_LEVEL_PROGRAMS = SCAN.pass_block, SCAN.pass_chunks, \
    SCAN.pass_max_steps, SCAN.pass_level_programs
DW_PROGRAMS = CONV.dw_programs


@dataclasses.dataclass
class Shape:
    B: int
    T: int
    D: int
    R: int
    K: int = 8
    s: int = 2                       # element size of x (2: bf16 / fp16, 4: fp32)
    sms: int = SMS_H200

    @property
    def tokens(self) -> int:
        return self.B * self.T

    @property
    def NC(self) -> int:
        return self.B * math.ceil(self.T / CHUNK)

    @property
    def BR(self) -> int:
        return max(16, 1 << (self.R - 1).bit_length())

    @property
    def BD(self) -> int:             # channel block of the tile kernels (kernels/settings.py, sm_90)
        return min(32 if self.s == F32 and self.BR > 32 else 64, max(16, 1 << (self.D - 1).bit_length()))

    @property
    def nd(self) -> int:
        return math.ceil(self.D / self.BD)

    @property
    def nd_out(self) -> int:         # channel blocks of _k2_out_kernel (kernels/settings.py, sm_90)
        return math.ceil(self.D / (16 if self.BR > 32 else min(self.BD, 32) if self.s == F32 else self.BD))

    @property
    def nd_dx(self) -> int:
        return math.ceil(self.D / (16 if self.BR > 32 or self.s == F32 else min(self.BD, 32)))

    @property
    def pass_grid(self) -> int:      # the state pass: PASS_BLOCK (128) flat (r, d) entries a program
        return self.B * math.ceil(self.R * self.D / PASS_BLOCK)

    @property
    def pass_steps(self) -> int:     # its dependent steps: PASS_CHUNKS (16) chunks composed per step
        return math.ceil(math.ceil(self.T / CHUNK) / PASS_CHUNKS)

    @property
    def pass_group(self) -> int:     # kernels/scan.py pass_group: chunks per group of the grouped pass, 0: one level
        nt = math.ceil(self.T / CHUNK)
        if math.ceil(nt / PASS_CHUNKS) <= PASS_MAX_STEPS or self.pass_grid >= PASS_LEVEL_PROGRAMS:
            return 0
        return max(PASS_CHUNKS, 1 << math.isqrt(nt - 1).bit_length())

    @property
    def fold_qk(self) -> bool:       # kernels/k2.py fold_qk: the projection folded into the chunk-state pass
        return CHUNK * self.BR <= QK_TILE and self.NC >= FOLD_MIN_CHUNKS

    @property
    def st(self) -> float:           # one (R, D) float32 state per chunk, per token
        return self.R * self.D * F32 / CHUNK

    @property
    def halo(self) -> float:         # the conv's K - 1 rows beyond a chunk, relative to it
        return min(self.K - 1, self.T) / CHUNK


@dataclasses.dataclass
class Launch:
    name: str
    act: float
    small: float = 0.0
    states: float = 0.0
    grid: int = 0
    cached: float = 0.0
    note: str = ""
    steps: int = 1                   # dependent steps of one program (the sequential walks)


def state_pass(S: Shape, reverse: bool = False) -> List[Launch]:
    """The walk over the chunk states (kernels/scan.py ``ChunkPlan.state_pass``): one launch of
    ceil(NT / 16) dependent steps, or, for long sequences on few programs, three: A the groups'
    totals (reads every state once more), B the walk over the totals, C each group's own walk."""
    tag = " (reverse)" if reverse else ""
    G = S.pass_group
    if G == 0:
        return [Launch("_state_pass_kernel" + tag, 0, 0, 2 * S.st, S.pass_grid, steps=S.pass_steps,
                       note="the walk over chunks, 16 composed per step")]
    NG = S.B * math.ceil(math.ceil(S.T / CHUNK) / G)
    blocks = math.ceil(S.R * S.D / PASS_BLOCK)
    return [
        Launch("_group_sum_kernel" + tag, 0, 0, S.st * (1 + 1 / G), blocks * NG,
               note=f"level A: each group's total of {G} chunk states (reads them; writes 1 / {G})"),
        Launch("_state_pass_kernel" + tag, 0, 0, 2 * S.st / G, S.pass_grid,
               steps=math.ceil(math.ceil(S.T / (CHUNK * G)) / PASS_CHUNKS),
               note="level B: the walk over the group totals"),
        Launch("_group_apply_kernel" + tag, 0, 0, S.st * (2 + 1 / G), blocks * NG, steps=math.ceil(G / PASS_CHUNKS),
               note="level C: each group's walk from its entry value, in place"),
    ]


def _bm(S: Shape) -> int:                # kernels/settings.py _block_m
    return max(16, min(64, QK_TILE // S.BR))


# --------------------------------------------------------------------------------------
# the paths, launch by launch
# --------------------------------------------------------------------------------------


def fused_fwd(S: Shape) -> List[Launch]:
    R, D, s = S.R, S.D, S.s
    if S.fold_qk:
        first = [Launch("_k2_qk_state_kernel", D * s, (3 * R + 2) * F32, S.st, S.NC,
                        cached=D * s + 2 * D * R * F32 / CHUNK,
                        note="reads x (its second read, right after the first, from L2); writes q, k, "
                             "q_hat, norms and the chunk-local states; u, v per program (cached)")]
    else:
        first = [
            Launch("_k2_qk_kernel", D * s, (3 * R + 2) * F32, grid=math.ceil(S.tokens / _bm(S)),
                   cached=2 * D * R * F32 / _bm(S), note="reads x; writes q, k, q_hat, norms; u, v per program (cached)"),
            Launch("_chunk_state_kernel", D * s, R * F32, S.st, S.NC * S.nd, cached=R * F32 * (S.nd - 1),
                   note="reads x, k")]
    return [
        *first,
        *state_pass(S),
        Launch("_k2_out_kernel", D * s * (2 + S.halo), 2 * R * F32, S.st, S.nd_out * S.NC,
               cached=D * s + 2 * R * F32 * (S.nd_out - 1), note="reads x (+ halo), q, k, S_prev; writes y"),
    ]


def fused_bwd(S: Shape) -> List[Launch]:
    R, D, s = S.R, S.D, S.s
    n_sub = CHUNK // SUB
    fused = S.s != F32                    # the in-kernel weight-gradient sums: 16-bit inputs only
    # [du | dv] = x^T dp in the kernel for R <= 32, but for R <= 16 (kernels/settings.py FUSE_DUV, sm_90:
    # off for bf16 at R <= 16 on plain inputs, where its accumulators cost occupancy; a Shape knows only
    # the element size: 16-bit read as bf16, inputs as plain -- B rows of T tokens, no conv states)
    fuse_duv, fuse_dw = S.BR <= MAX_FUSED_R and S.BR > 16 and fused, S.K <= MAX_FUSED_TAPS and fused
    G = max(1, min(MAX_GROUP, S.NC * S.nd_dx // DX_TARGET))
    NG = math.ceil(S.NC / G)
    part = NG * (D * 2 * R * F32 * fuse_duv + (D * S.K * F32 if fuse_dw else 0)) / S.tokens
    out = [
        Launch("_chunk_state_kernel (reverse)", D * s, R * F32, S.st, S.NC * S.nd, cached=R * F32 * (S.nd - 1),
               note="reads dy, q"),
        *state_pass(S, reverse=True),
        Launch("_bwd_dqk_kernel", 2 * D * s, 4 * R * F32, 2 * S.st, n_sub * S.NC,
               cached=2 * D * s * (n_sub - 1) + 2 * S.st * (n_sub - 1),
               note="reads x, dy (whole chunk per sub-chunk program), S_prev, G"),
        Launch("_k2_dp_kernel", 0, (6 * R + 2) * F32, grid=math.ceil(S.tokens / _bm(S))),
        Launch("_k2_dx_kernel", D * s * (2 + S.halo + (1 if fuse_duv or fuse_dw else 0)), 4 * R * F32 + part,
               S.st, S.nd_dx * NG, cached=D * s * (S.K if fuse_dw else 0), steps=G,
               note=f"reads dy (+ halo), x, q, k, dp, G; writes dx and per-group partials; {G} chunks a program"),
    ]
    if not fuse_duv:
        out.append(Launch("x^T dp (cuBLAS)", D * s, 2 * R * (F32 + s)))
    if not fuse_dw:
        out.append(Launch("_conv_bwd_dw_kernel", 2 * D * s * math.ceil(S.K / 32), grid=DW_PROGRAMS))
    return out


def _old_bd(S: Shape) -> int:
    bd = 16 if S.R > 32 else min(64, max(16, 1 << (S.D - 1).bit_length()))
    while bd > 16 and S.B * math.ceil(S.D / bd) < S.sms:       # the old block_d on a GPU
        bd //= 2
    return bd


def old_fused_fwd(S: Shape) -> List[Launch]:
    D, s = S.D, S.s
    bd = _old_bd(S)
    nd = math.ceil(D / bd)
    single = D <= bd and S.R <= 32
    return [Launch("_k2_fwd_kernel (old)", D * s * ((1 if single else nd) + 1), 0, S.st, S.B * nd,
                   cached=0 if single else D * s, steps=math.ceil(S.T / SUB),
                   note=f"{S.B * nd} programs of {math.ceil(S.T / SUB)} dependent 16-token steps; "
                        "every channel block projects all of D")]


def _scan_bwd(S: Shape, q_s: int, old: bool = False) -> List[Launch]:
    R, D, s = S.R, S.D, S.s
    n_sub = CHUNK // SUB
    per_block = S.nd if old else 1        # e1fc1ef's grids ran the chunks of one channel block first
    return [
        Launch("_chunk_state_kernel (reverse)", D * s, R * q_s * per_block, S.st, S.NC * S.nd),
        *([Launch("_state_pass_kernel (reverse)", 0, 0, 2 * S.st, S.B * math.ceil(R * D / 512),  # e1fc1ef's
                  steps=math.ceil(S.T / CHUNK))] if old else state_pass(S, reverse=True)),
        Launch("_intra_A_kernel", 0, 2 * R * q_s + CHUNK * F32, grid=S.NC * n_sub, note="writes A (rows, 64)"),
        Launch("_chunk_out_kernel (reverse: dv)", 2 * D * s, (CHUNK * F32 + R * q_s) * per_block, S.st,
               S.NC * S.nd),
        Launch("_bwd_dqk_kernel", 2 * D * s, 4 * R * q_s, 2 * S.st * n_sub, S.NC * n_sub,
               cached=2 * D * s * (n_sub - 1)),
    ]


def old_fused_bwd(S: Shape) -> List[Launch]:
    R, D, s = S.R, S.D, S.s
    up = 0 if s == F32 else D * (s + F32)                     # x.float() / dy.float() copies
    return [
        Launch("x.float(); q, k = x @ [u|v], normalise (PyTorch)", up + D * F32, 12 * R * F32),
        *_scan_bwd(S, s, old=True),
        Launch("dp chain, [du|dv] = x^T dp (PyTorch)", D * F32, 16 * R * F32),
        Launch("gate * dy.float() (PyTorch)", D * s + 2 * D * F32 + up),
        Launch("_conv_bwd_dx_kernel", D * F32 * (2 + S.halo), grid=math.ceil(S.T / 64) * S.B * S.nd),
        Launch("_conv_bwd_dw_kernel", 2 * D * s * math.ceil(S.K / 32), grid=512),
        Launch("dx = dxs.float() + dxc + dp @ uv^T, cast (PyTorch)", D * s + 8 * D * F32 + D * s, 2 * R * F32),
    ]


def unfused_fwd(S: Shape) -> List[Launch]:
    R, D, s = S.R, S.D, S.s
    n_sub = CHUNK // SUB
    return [
        Launch("x @ u, x @ v, normalise (PyTorch)", 2 * D * s, 12 * R * s),
        Launch("_intra_A_kernel", 0, 2 * R * s + CHUNK * F32, grid=S.NC * n_sub),
        Launch("_chunk_state_kernel", D * s, R * s, S.st, S.NC * S.nd),
        *state_pass(S),
        Launch("_chunk_out_kernel", 2 * D * s, CHUNK * F32 + R * s, S.st, S.NC * S.nd),
        Launch("_conv_fwd_kernel", D * s * (2 + S.halo), grid=math.ceil(S.T / 64) * S.B * S.nd),
        Launch("sigmoid(g) * c + y (PyTorch)", 5 * D * s, note="two elementwise ops"),
    ]


def unfused_bwd(S: Shape) -> List[Launch]:
    R, D, s = S.R, S.D, S.s
    return [
        Launch("mul backward: g dy, sum(dy c) (PyTorch)", 6 * D * s),
        Launch("_conv_bwd_dx_kernel", D * s * (2 + S.halo), grid=math.ceil(S.T / 64) * S.B * S.nd),
        Launch("_conv_bwd_dw_kernel", 2 * D * s * math.ceil(S.K / 32), grid=512),
        *_scan_bwd(S, s),
        Launch("normalise + projection backward (PyTorch)", 4 * D * s, 18 * R * s,
               note="dp @ u^T, dp @ v^T, x^T dp twice"),
        Launch("autograd: sum of 4 dx contributions", 9 * D * s),
    ]


def chunked_fwd(S: Shape) -> List[Launch]:
    R, D = S.R, S.D
    s, st = F32, R * D * F32 / 16
    return [
        Launch("q, k = x @ [u|v], normalise", D * s, 10 * R * s),
        Launch("A = einsum(q, k, decays) + conv band", 0, 2 * R * s + 2 * 16 * s),
        Launch("chunk states (k d)^T @ x, carry loop, S_prev copy", D * s, R * s, 5 * st),
        Launch("o = A @ x; o += (q g) @ S_prev; conv tails", 3 * D * s + D * s * S.halo * 4, R * s, st),
    ]


def chunked_bwd(S: Shape) -> List[Launch]:
    R, D = S.R, S.D
    s, st = F32, R * D * F32 / 16
    return [
        Launch("state gradients (q g)^T @ dy, carry loop, copy", D * s, R * s, 5 * st),
        Launch("dA = dy @ x^T; dv = A^T dy + kd @ G", 5 * D * s, 16 * s, st),
        Launch("dq, dk: dy @ S_prev^T, x @ G^T, intra terms", 2 * D * s, 10 * R * s, 2 * st),
        Launch("dx += dp @ uv^T; [du|dv] = x^T dp; conv terms", 3 * D * s, 12 * R * s),
    ]


PATHS: Dict[str, Dict[str, Callable[[Shape], List[Launch]]]] = {
    "fused": {"fwd": fused_fwd, "bwd": fused_bwd},
    "old_fused": {"fwd": old_fused_fwd, "bwd": old_fused_bwd},
    "unfused": {"fwd": unfused_fwd, "bwd": unfused_bwd},
    "chunked": {"fwd": chunked_fwd, "bwd": chunked_bwd},
}


def model(path: str, S: Shape) -> dict:
    """Per-launch rows and totals of one path at one shape, forward and backward."""
    out = {"path": path, "shape": dataclasses.asdict(S), "label": "model, not a measurement"}
    for mode, fn in PATHS[path].items():
        rows = fn(S)
        act = sum(r.act for r in rows)
        small = sum(r.small for r in rows)
        states = sum(r.states for r in rows)
        grids = [r.grid for r in rows if r.grid and r.steps == 1]
        walks = [r for r in rows if r.steps > 1]
        out[mode] = {
            "launches": [dataclasses.asdict(r) for r in rows],
            "bytes_per_token": act + small + states, "act_bytes_per_token": act,
            "small_bytes_per_token": small, "state_bytes_per_token": states,
            "passes": act / (S.D * S.s), "copy_bound_passes": 2 if mode == "fwd" else 3,
            "fraction_of_copy_bound": (2 if mode == "fwd" else 3) * S.D * S.s / (act + small + states),
            "smallest_parallel_grid": min(grids) if grids else None,
            "longest_walk": max(((r.steps, r.grid) for r in walks), default=None),
        }
    return out


def table(shapes: List[Shape], paths=("old_fused", "fused", "unfused", "chunked")) -> str:
    lines = ["| D | T | path | fwd bytes/token | fwd D-wide passes | bwd bytes/token | bwd D-wide passes | "
             "fwd+bwd vs copy bound | smallest parallel grid (fwd / bwd) | longest walk: steps x programs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for S in shapes:
        for p in paths:
            m = model(p, S)
            f, b = m["fwd"], m["bwd"]
            frac = 5 * S.D * S.s / (f["bytes_per_token"] + b["bytes_per_token"])
            walk = max([w for w in (f["longest_walk"], b["longest_walk"]) if w], default=None)
            lines.append(f"| {S.D} | {S.T} | {p} | {f['bytes_per_token']:.0f} | {f['passes']:.2f} | "
                         f"{b['bytes_per_token']:.0f} | {b['passes']:.2f} | {frac:.0%} | "
                         f"{f['smallest_parallel_grid'] or '-'} / {b['smallest_parallel_grid'] or '-'} | "
                         f"{f'{walk[0]} x {walk[1]}' if walk else '-'} |")
    return "\n".join(lines)


def main(argv=None):
    import json
    import sys
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--D", default="64,256,1024")
    p.add_argument("--T", default="2048,65536,1048576")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--R", type=int, default=16)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--json", default="-")
    a = p.parse_args(argv)
    s = 4 if a.dtype == "fp32" else 2
    paths = a.paths.split(",")
    shapes = [Shape(a.B, int(T), int(D), a.R, a.K, s) for D in a.D.split(",") for T in a.T.split(",")]
    doc = {"label": "model, not a measurement", "dtype": a.dtype,
           "models": [model(pth, S) for S in shapes for pth in paths]}
    text = json.dumps(doc, indent=1)
    if a.json == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    sys.stderr.write(table(shapes, paths) + "\n")
    return doc


if __name__ == "__main__":
    main()
