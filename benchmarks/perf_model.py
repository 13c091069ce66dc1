"""A latency- and occupancy-aware performance MODEL (not a measurement) of the fused K2 mixer, per launch.

For every launch of ``k2_mixer(backend="triton")`` forward and backward (recorded from the real
launchers with ``kop_triton.kernels.launch.recording``: grids, warps and constexprs exactly as a
132-SM sm_90 GPU would get them, on meta tensors, no GPU) the model predicts

    time = max( bytes / achievable bandwidth,  dependent steps x step latency,  flops / peak )

  bytes       ``benchmarks/traffic.py``'s bytes of that launch (joined by kernel name, in launch
              order); a launch traffic.py has no row for is priced from its tensor arguments' sizes
              (each read or written once) and says so (``bytes_source``).
  bandwidth   min(copy bandwidth x SMs covered / SMs, bytes in flight chip-wide / DRAM latency) (each SM
              at most its share of the copy bandwidth: an assumption; Little's law).  Bytes in
              flight = resident CTAs (the CUDA occupancy rules for sm_90, from the registers, shared
              memory and warps that ptxas reports in the compile gate's JSON, and no more CTAs than the
              grid has) x the bytes one CTA moves per iteration of its loop (its bytes, loads and stores
              alike, / the iterations per program, from the launch's constexprs: ``ITERATIONS``) -- the
              loads of an iteration are issued before their first use, the next iteration's only after
              it -- x num_stages when the PTX has ``cp.async`` (a pipelined loop), else x 1.  L2 hits
              (traffic.py's ``cached`` bytes) are neither counted nor in flight.
  steps       the dependent steps of a walk that carries a value from step to step (the state pass:
              ceil(NT / CB) per direction), each a load, a cross-warp scan and a store: STEP_LATENCY;
              every other launch: 1 step of DRAM latency.
  flops       per kernel (``FLOPS``), on tensor cores for 16-bit dots (DOT_MODE 1, 2), else CUDA cores.

Per op (fwd, bwd, fwd+bwd): the sum of the launches (run back to back; launch overheads, ~2-4 us
each from the host, are not modelled: they dominate at T = 2K) and the fraction of the copy bound
(2 D-wide passes forward, 3 backward, at the copy bandwidth).  ``WHATIFS``: the same model with
parameters changed (states every 256 tokens, 16-bit states, ...) -- parameters of the model, not
kernel changes -- to rank the changes by what they pay.

    python -m benchmarks.perf_model --write-gate gate.json              # the compile gate on the model's shapes
    python -m benchmarks.perf_model --gate-json gate.json --json m.json --md m.md

Both must run without TRITON_INTERPRET (as the compile gate: the launchers then pick the GPU's
operand modes).  The gate's own CLI (``python -m kop_triton.kernels.report --json``) writes the
same JSON; any gate JSON holding the launches' specialisations for sm_90 will do.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

from . import traffic

LABEL = "model, not a measurement"


# --------------------------------------------------------------------------------------
# constants, each with its source
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    sms: int                    # SMs
    copy_bw: float              # B/s a device-to-device copy reaches (read + write counted)
    mem_latency: float          # s, DRAM load latency under load
    step_latency: float         # s, one dependent step of the state pass: load + cross-warp scan + store
    tc_peak: float              # FLOP/s, 16-bit tensor-core matmul
    fp32_peak: float            # FLOP/s, CUDA-core fp32 (FMA = 2 flops)
    # per-SM limits, compute capability 9.0 (sm_90)
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256            # registers, allocated per warp
    subpartitions: int = 4               # register file split in 4 (one per warp scheduler)
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_cta_max: int = 227 * 1024
    smem_reserved_per_cta: int = 1024    # the CUDA runtime's per-CTA reservation (sm_80 and later)
    smem_alloc_unit: int = 128


SOURCES = {
    "sms": "132 SMs: NVIDIA H100 SXM5 and H200 SXM (NVIDIA H100 Tensor Core GPU datasheet; H200 datasheet)",
    "copy_bw": "issue 20: measured device-to-device copy on this project's lent machines, H100 ~3.0 TB/s, "
               "H200 ~4.3 TB/s",
    "mem_latency": "issue 20: ~600 ns DRAM latency (an assumption of the model, in line with published "
                   "microbenchmarks of Hopper's global-memory latency under load)",
    "step_latency": "assumption, issue 20: ~1 us per dependent step of the state pass (a load, a cross-warp "
                    "tl.associative_scan, a store; one DRAM round trip plus the scan and the store's issue)",
    "tc_peak": "issue 20: ~790 TFLOP/s bf16/fp16 matmul measured on both machines (dense)",
    "fp32_peak": "NVIDIA H100 SXM datasheet: 67 TFLOP/s FP32 (CUDA cores); used for H200 too (same SM, clocks)",
    "occupancy": "NVIDIA CUDA C Programming Guide, Technical Specifications per Compute Capability, 9.0: "
                 "65,536 32-bit registers per SM, at most 255 per thread, 64 resident warps and 32 resident "
                 "blocks per SM, 228 KB shared memory per SM, 227 KB per block; register allocation unit 256 "
                 "per warp over 4 sub-partitions, shared memory unit 128 B and 1 KB reserved per block "
                 "(CUDA Occupancy Calculator / cuda_occupancy.h)",
}

H100 = GPU("H100 SXM", 132, 3.0e12, 600e-9, 1e-6, 790e12, 67e12)
H200 = GPU("H200", 132, 4.3e12, 600e-9, 1e-6, 790e12, 67e12)
GPUS = {"h100": H100, "h200": H200}


def _ceil_to(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, warps: int, smem: int, hw: GPU = H100) -> Dict:
    """Resident CTAs and warps per SM of a kernel (CUDA's occupancy rules, ``cuda_occupancy.h``):
    registers per warp rounded up to the allocation unit, whole warps per register sub-partition;
    shared memory per CTA rounded up, plus the runtime's reservation; warps and CTAs per SM.
    -> {"ctas_per_sm", "warps_per_sm", "limiter", "by": per-rule CTA limits}."""
    if regs > hw.max_regs_per_thread or smem > hw.smem_per_cta_max or warps < 1:
        return {"ctas_per_sm": 0, "warps_per_sm": 0, "limiter": "does not fit", "by": {}}
    per_warp = _ceil_to(max(regs, 1) * 32, hw.reg_alloc_unit)
    warps_regs = (hw.regs_per_sm // hw.subpartitions // per_warp) * hw.subpartitions
    by = {"registers": warps_regs // warps,
          "warps": hw.max_warps_per_sm // warps,
          "ctas": hw.max_ctas_per_sm}
    if smem:
        by["shared memory"] = hw.smem_per_sm // (_ceil_to(smem, hw.smem_alloc_unit) + hw.smem_reserved_per_cta)
    ctas = min(by.values())
    limiter = min(by, key=lambda k: (by[k], ["registers", "shared memory", "warps", "ctas"].index(k)))
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps, "limiter": limiter, "by": by}


# --------------------------------------------------------------------------------------
# per-kernel knowledge the compiled figures do not give: loop iterations and flops
# --------------------------------------------------------------------------------------

def _cdiv(a, b):
    return -(-int(a) // int(b))


# iterations of a program's main loop (each issues its loads, then uses them), from the launch's
# arguments and its number of programs; a kernel not listed counts 1 (all its loads at once)
ITERATIONS: Dict[str, Callable[[Dict, int], int]] = {
    "_k2_qk_kernel": lambda kw, P: _cdiv(kw["D"], kw["BD"]),                   # over D in BD blocks
    "_chunk_state_kernel": lambda kw, P: _cdiv(kw["BT"], kw["BK"]),           # over the chunk in BK rows
    "_k2_qk_state_kernel": lambda kw, P: 2 * _cdiv(kw["D"], kw["BD"]),         # over D twice (x @ [u | v], k^T x)
    "_state_pass_kernel": lambda kw, P: _cdiv(kw["NT"], kw["CB"]),            # over the chunks, CB a step
    "_group_sum_kernel": lambda kw, P: _cdiv(kw["G"], kw["CB"]),              # the group's chunks, CB at a time
    "_group_apply_kernel": lambda kw, P: _cdiv(kw["G"], kw["CB"]),            # its walk over the group
    "_k2_out_kernel": lambda kw, P: _cdiv(kw["BT"], kw["BC"]),                # over the sub-chunks
    "_bwd_dqk_kernel": lambda kw, P: _cdiv(kw["D"], kw["BD"]) * (1 + _cdiv(kw["BR"], kw["BRS"])),
    "_k2_dp_kernel": lambda kw, P: 1,
    "_k2_dx_kernel": lambda kw, P: kw["G"] * _cdiv(kw["BT"], kw["BC"]),       # G chunks x sub-chunks
    # time blocks strided by the NS programs of axis 2
    "_conv_bwd_dw_kernel": lambda kw, P: _cdiv(kw["n_blocks"], max(1, P // (_cdiv(kw["K"], kw["BL"])
                                                                             * _cdiv(kw["D"], kw["BD"])))),
}

# kernels whose steps carry a value (a dependent chain: the latency term counts them)
DEPENDENT: Dict[str, Callable[[Dict], int]] = {
    "_state_pass_kernel": lambda kw: _cdiv(kw["NT"], kw["CB"]),
    "_group_apply_kernel": lambda kw: _cdiv(kw["G"], kw["CB"]),
}

# flops per token (D, R, K, chunk BT): the dots of each kernel (2 flops a multiply-add)
FLOPS: Dict[str, Callable[[int, int, int, int], float]] = {
    "_k2_qk_kernel": lambda D, R, K, BT: 2 * D * 2 * R,                            # x @ [u | v]
    "_chunk_state_kernel": lambda D, R, K, BT: 2 * R * D,                          # k^T x per chunk
    "_k2_qk_state_kernel": lambda D, R, K, BT: 2 * D * 2 * R + 2 * R * D,          # x @ [u | v], k^T x
    "_state_pass_kernel": lambda D, R, K, BT: 4 * R * D / BT,                      # elementwise compose
    "_group_sum_kernel": lambda D, R, K, BT: 2 * R * D / BT,                       # decay-weighted sum
    "_group_apply_kernel": lambda D, R, K, BT: 4 * R * D / BT,
    "_k2_out_kernel": lambda D, R, K, BT: 2 * BT * R + 2 * BT * D + 2 * R * D + 2 * K * D,  # A, A x, q S, conv
    "_bwd_dqk_kernel": lambda D, R, K, BT: 2 * 2 * BT * D + 4 * R * D,            # dA (2 ways), dy S^T, x G^T
    "_k2_dp_kernel": lambda D, R, K, BT: 20 * R,
    "_k2_dx_kernel": lambda D, R, K, BT: 2 * BT * D + 2 * R * D + 4 * R * D + 4 * K * D,   # x^T dp: its own row
    "x^T dp (cuBLAS)": lambda D, R, K, BT: 4 * R * D,
}


# --------------------------------------------------------------------------------------
# recording the launches (no GPU)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    D: int
    T: int
    B: int = 1
    R: int = 16
    K: int = 8
    dtype: str = "bf16"

    @property
    def s(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def tokens(self) -> int:
        return self.B * self.T

    def traffic_shape(self) -> "traffic.Shape":
        return traffic.Shape(self.B, self.T, self.D, self.R, self.K, self.s)

    def label(self) -> str:
        return f"{self.dtype} B={self.B} T={self.T} D={self.D} R={self.R} K={self.K}"


def record(S: Shape, arch: int = 90, sms: int = 132) -> List[Dict]:
    """Every launch of the fused K2 mixer's forward and backward at ``S``, recorded on meta tensors
    as a ``sms``-SM sm_<arch> GPU gets them -> [{"phase", "kernel", "grid", "programs", "kwargs"
    (the non-tensor arguments), "tensor_bytes", "dtype", "config"}]; "dtype" and "config" are the
    compile gate's columns for that launch's specialisation."""
    from kop_triton.kernels.report import DTYPES, _require_compiler, launch_spec
    _require_compiler("the performance model (it records launches as the compile gate does)",
                      "python -m benchmarks.perf_model ...")
    import torch

    from kop_triton.kernels.launch import recording
    from kop_triton.ops.k2 import triton_k2_mixer
    dt, f32 = DTYPES[S.dtype], torch.float32
    mk = lambda *s, dtype=f32: torch.empty(*s, dtype=dtype, device="meta").requires_grad_()  # noqa: E731
    x = mk(S.B, S.T, S.D, dtype=dt)
    ins = [x, mk(S.D, S.R), mk(S.D, S.R), mk(S.R), mk(S.R), mk(S.K), mk(())]
    with recording(sms=sms, arch=arch) as rec:
        y, _ = triton_k2_mixer(*ins)
        n_fwd = len(rec.launches)
        torch.autograd.grad([y], ins, [torch.ones_like(y)], allow_unused=True)
    out, binders = [], {}
    for i, ln in enumerate(rec.launches):
        sp = launch_spec(ln, arch, False, binders)
        out.append({"phase": "fwd" if i < n_fwd else "bwd", "kernel": ln.name, "grid": list(ln.grid),
                    "programs": math.prod(ln.grid),
                    "kwargs": {k: v for k, v in ln.kwargs.items() if isinstance(v, (int, float, bool))},
                    "tensor_bytes": sum(v.numel() * v.element_size() for v in ln.kwargs.values()
                                        if isinstance(v, torch.Tensor)),
                    "dtype": sp.dtype, "config": sp.config})
    return out


# --------------------------------------------------------------------------------------
# the compile gate's figures
# --------------------------------------------------------------------------------------


class MissingSpecs(LookupError):
    """Launches whose specialisation the gate JSON does not hold."""


def gate_index(doc: Dict, target: str = "sm_90") -> Dict:
    """(kernel, dtype, config) -> the gate row, for ``target``, from the gate's JSON document."""
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError("not a compile-gate JSON: expected an object with a 'rows' list "
                         "(python -m kop_triton.kernels.report --json FILE)")
    idx = {}
    for r in doc["rows"]:
        if r.get("target") == target and not r.get("error"):
            idx[(r["kernel"], r["dtype"], r["config"])] = r
    return idx


def attach_gate(launches: List[Dict], idx: Dict) -> List[Dict]:
    """Each recorded launch with its ptxas figures: registers, shared memory, warps, stages, cp.async."""
    missing = sorted({f"{ln['kernel']} [{ln['dtype']}; {ln['config']}]" for ln in launches
                      if (ln["kernel"], ln["dtype"], ln["config"]) not in idx})
    if missing:
        raise MissingSpecs(f"the gate JSON has no sm_90 row for {len(missing)} specialisation(s): "
                           + "; ".join(missing[:6]) + ("; ..." if len(missing) > 6 else "")
                           + ". Make one that has: python -m benchmarks.perf_model --write-gate FILE")
    out = []
    for ln in launches:
        r = idx[(ln["kernel"], ln["dtype"], ln["config"])]
        out.append({**ln, "registers": r["registers"], "smem": r["smem"], "num_warps": r["num_warps"],
                    "num_stages": r["num_stages"], "cp_async": r.get("cp_async"), "mma": r.get("mma")})
    return out


# --------------------------------------------------------------------------------------
# pricing
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WhatIf:
    """Parameters of the model (not kernel changes): the default prices the kernels as compiled."""
    name: str = "as compiled"
    state_interval: int = 64         # tokens per stored chunk state (the chunk: 64)
    state_bytes: int = 4             # bytes per stored state element (float32); 16-bit inputs only
    fold_qk: bool = False            # the q/k projection folded into the chunk-state pass: x read once less
    min_warps_per_sm: int = 0        # every tile kernel at least this many resident warps per SM
    pipelined: bool = False          # every tile kernel's loads 2 stages deep (cp.async)
    walk_programs_min: int = 0       # the state pass on at least this many programs
    walk_step_divisor: int = 1       # its dependent steps divided by this (a two-level pass)
    small_scale: float = 1.0         # the O(R) planes' bytes (q, k, q_hat, norms, dp: float32) scaled
    act_at_copy_bound: bool = False  # D-wide activation bytes of each op scaled to the copy bound's passes
    walk_in_consumers: bool = False  # the grouped pass's levels A and C gone (see WHATIFS)
    note: str = ""


WALK = ("_state_pass_kernel", "_group_sum_kernel", "_group_apply_kernel")   # the state pass, one or three levels


def _traffic_rows(S: Shape) -> Dict[str, List["traffic.Launch"]]:
    ts = S.traffic_shape()
    return {"fwd": traffic.fused_fwd(ts), "bwd": traffic.fused_bwd(ts)}


def join_traffic(S: Shape, launches: List[Dict]) -> List[Dict]:
    """Each recorded launch with traffic.py's row of the same kernel (in launch order within its
    phase), plus traffic.py's rows that are no Triton launch (PyTorch / cuBLAS: priced at the copy
    bandwidth).  A recorded launch without a row is priced from its tensor arguments' sizes."""
    rows = _traffic_rows(S)
    out = []
    for phase in ("fwd", "bwd"):
        pool = list(rows[phase])
        for ln in [x for x in launches if x["phase"] == phase]:
            m = next((r for r in pool if r.name.split(" ")[0] == ln["kernel"]), None)
            if m is not None:
                pool.remove(m)
                out.append({**ln, "traffic_name": m.name, "act": m.act, "small": m.small, "states": m.states,
                            "bytes_source": "benchmarks/traffic.py"})
            else:
                out.append({**ln, "traffic_name": None, "act": ln["tensor_bytes"] / S.tokens, "small": 0.0,
                            "states": 0.0, "bytes_source": "tensor arguments' sizes (no traffic.py row)"})
        for r in pool:
            if not r.name.startswith("_"):             # a PyTorch / cuBLAS op of the path, not a Triton launch
                out.append({"phase": phase, "kernel": r.name, "traffic_name": r.name, "grid": [], "programs": 0,
                            "act": r.act, "small": r.small, "states": r.states, "torch_op": True,
                            "bytes_source": "benchmarks/traffic.py", "kwargs": {}})
            else:                                      # a Triton launch traffic.py expects and nothing launched
                out.append({"phase": phase, "kernel": r.name, "unlaunched_traffic_row": True, "grid": [],
                            "programs": 0, "act": 0.0, "small": 0.0, "states": 0.0, "kwargs": {},
                            "bytes_source": "traffic.py row with no recorded launch: not priced"})
    return out


def price_launch(ln: Dict, S: Shape, hw: GPU = H100, w: WhatIf = WhatIf(), act_scale: float = 1.0) -> Dict:
    """One launch's predicted time and what bounds it (see the module's docstring)."""
    kw = ln.get("kwargs", {})
    name = ln["kernel"]
    act = ln["act"] * (0 if (w.fold_qk and name == "_k2_qk_kernel") else 1) * act_scale
    # 16-bit states for 16-bit inputs only (fp32 inputs keep fp32 states)
    states = ln["states"] * (64 / w.state_interval) * ((w.state_bytes if S.s == 2 else 4) / 4)
    small = ln["small"] * w.small_scale
    per_token = act + small + states
    nbytes = per_token * S.tokens
    BT = kw.get("BT", traffic.CHUNK)
    fl = FLOPS.get(name)
    flops = fl(S.D, S.R, S.K, BT) * S.tokens if fl else 0.0
    tensor = kw.get("DOT_MODE", 1 if S.s == 2 else 0) in (1, 2)
    peak = hw.tc_peak if tensor else hw.fp32_peak
    row = {"phase": ln["phase"], "kernel": name, "traffic_name": ln.get("traffic_name"),
           "bytes_per_token": per_token, "act_bytes_per_token": act, "small_bytes_per_token": small,
           "state_bytes_per_token": states, "bytes": nbytes, "bytes_source": ln["bytes_source"],
           "flops": flops, "flops_source": "FLOPS table" if fl else "not modelled (0)",
           "peak": "tensor cores" if tensor else "CUDA cores fp32"}
    if ln.get("unlaunched_traffic_row"):
        row.update(time_s=0.0, bound="-", limit="-", note="traffic.py row with no recorded launch")
        return row
    if w.walk_in_consumers and name.split(" ")[0] in ("_group_sum_kernel", "_group_apply_kernel"):
        row.update(bytes_per_token=0.0, act_bytes_per_token=0.0, small_bytes_per_token=0.0,
                   state_bytes_per_token=0.0, bytes=0.0, flops=0.0, time_s=0.0, bound="none",
                   limit="folded away (what-if)",
                   note="what-if: folded into the chunk-state pass and the consumers")
        return row
    if ln.get("torch_op"):
        t_b, t_c = nbytes / hw.copy_bw, flops / peak
        row.update(programs=0, t_bytes=t_b, t_latency=0.0, t_compute=t_c, time_s=max(t_b, t_c),
                   bound="compute" if t_c > t_b else "bytes", limit="copy bandwidth (assumed)" if t_b >= t_c
                   else "CUDA-core fp32 peak" if not tensor else "tensor-core peak",
                   note="PyTorch / cuBLAS op: priced at the copy bandwidth")
        return row
    P = ln["programs"]
    warps = ln["num_warps"]
    occ = occupancy(ln["registers"], warps, ln["smem"], hw)
    ctas = occ["ctas_per_sm"]
    walk = name in WALK
    if not walk and w.min_warps_per_sm:
        ctas = max(ctas, math.ceil(w.min_warps_per_sm / warps))
    if walk and w.walk_programs_min:
        P = max(P, w.walk_programs_min)
    it_fn = ITERATIONS.get(name)
    iters = max(1, it_fn(kw, ln["programs"])) if it_fn else 1
    dep_fn = DEPENDENT.get(name)
    steps = max(1, dep_fn(kw)) if dep_fn else 1
    if walk and dep_fn:
        steps = max(1, math.ceil(steps * 64 / w.state_interval / w.walk_step_divisor))
        iters = steps
    stages = ln["num_stages"] if (ln.get("cp_async") or 0) > 0 and ln["num_stages"] > 1 else 1
    if w.pipelined and not walk:
        stages = max(stages, 2)
    resident = min(P, ctas * hw.sms)
    per_cta = nbytes / max(P, 1) / iters * stages
    inflight = per_cta * resident
    share = hw.copy_bw * min(P, hw.sms) / hw.sms          # each SM at most its share of the copy bandwidth
    bw = min(share, inflight / hw.mem_latency) if inflight > 0 else share
    t_b = nbytes / bw if nbytes else 0.0
    t_l = steps * (hw.step_latency if dep_fn else hw.mem_latency)
    t_c = flops / peak
    t = max(t_b, t_l, t_c)
    if t_l >= t_b * (1 - 1e-9) and t_l >= t_c:
        bound, limit = "latency", "dependent steps" if dep_fn else "one DRAM round trip"
    elif t_c > t_b:
        bound, limit = "compute", "tensor-core peak" if tensor else "CUDA-core fp32 peak"
    elif bw >= hw.copy_bw:
        bound, limit = "bytes", "copy bandwidth"
    elif bw >= share:
        bound, limit = "bytes", "SMs covered (each at most 1/SMs of the copy bandwidth)"
    else:    # Little's law: too few bytes in flight to hide the DRAM latency
        bound, limit = "latency", "bytes in flight (occupancy x bytes a CTA loads per iteration)"
    row.update(grid=ln["grid"], programs=P, sms_covered=min(P, hw.sms), num_warps=warps,
               num_stages=ln["num_stages"], cp_async=ln.get("cp_async"), registers=ln["registers"],
               smem=ln["smem"], ctas_per_sm=ctas, warps_per_sm=ctas * warps, occupancy_limiter=occ["limiter"],
               resident_ctas=resident, iterations_per_program=iters,
               iterations_source="ITERATIONS table" if it_fn else "unknown: assumed 1",
               dependent_steps=steps, bytes_in_flight_per_cta=per_cta, bytes_in_flight=inflight,
               achievable_bw=bw, t_bytes=t_b, t_latency=t_l, t_compute=t_c, time_s=t, bound=bound, limit=limit,
               fraction_of_copy_speed=(nbytes / hw.copy_bw) / t if t else None, dtype=ln.get("dtype"),
               config=ln.get("config"))
    return row


def copy_bound(S: Shape, phase: str, hw: GPU = H100) -> float:
    """Seconds the op needs at the copy bandwidth: 2 D-wide passes forward, 3 backward."""
    passes = {"fwd": 2, "bwd": 3, "fwd_bwd": 5}[phase]
    return passes * S.D * S.s * S.tokens / hw.copy_bw


def price(S: Shape, launches: List[Dict], hw: GPU = H100, w: WhatIf = WhatIf()) -> Dict:
    """Per launch and per op (fwd, bwd, fwd_bwd) at one shape; ``launches`` from ``record`` +
    ``attach_gate`` (or the ``launches`` of an earlier model JSON)."""
    joined = join_traffic(S, launches)
    scale = {}
    for ph, passes in (("fwd", 2), ("bwd", 3)):
        act = sum(ln["act"] for ln in joined if ln["phase"] == ph
                  and not (w.fold_qk and ln["kernel"] == "_k2_qk_kernel"))
        scale[ph] = min(1.0, passes * S.D * S.s / act) if (w.act_at_copy_bound and act) else 1.0
    rows = [price_launch(ln, S, hw, w, scale[ln["phase"]]) for ln in joined]
    ops = {}
    for op, phases in (("fwd", ("fwd",)), ("bwd", ("bwd",)), ("fwd_bwd", ("fwd", "bwd"))):
        rs = [r for r in rows if r["phase"] in phases]
        t = sum(r["time_s"] for r in rs)
        cb = copy_bound(S, op, hw)
        ops[op] = {"time_s": t, "bytes_per_token": sum(r["bytes_per_token"] for r in rs),
                   "copy_bound_s": cb, "fraction_of_copy_bound": cb / t if t else None,
                   "launches": sum(1 for r in rs if r.get("programs")),
                   "latency_bound": sorted({r["kernel"] for r in rs if r["bound"] == "latency"}),
                   "walk_share": sum(r["time_s"] for r in rs if r["kernel"] in WALK) / t if t else None}
    return {"shape": dataclasses.asdict(S), "gpu": hw.name, "whatif": w.name, "launches": rows, "ops": ops}


WHATIFS = [
    WhatIf(),
    WhatIf("states every 256 tokens", state_interval=256,
           note="chunk states stored every 256 tokens, the tiles still 64: 4x fewer state bytes and walk steps"),
    WhatIf("16-bit chunk states", state_bytes=2, note="states stored in bf16/fp16, fp32 carried in registers"),
    WhatIf("x read twice forward", fold_qk=True, note="the q/k projection folded into the chunk-state pass"),
    WhatIf(">= 16 warps/SM, 2-stage loads", min_warps_per_sm=16, pipelined=True,
           note="every tile kernel at >= 16 resident warps per SM with cp.async 2-stage pipelined loads"),
    WhatIf("walk: 4 programs/SM, 16x fewer steps", walk_programs_min=4 * 132, walk_step_divisor=16,
           note="a two-level state pass (or more chunks a step) on >= 528 programs"),
    WhatIf("all of the above (the family's ceiling)", state_interval=256, state_bytes=2, fold_qk=True,
           min_warps_per_sm=16, pipelined=True, walk_programs_min=4 * 132, walk_step_divisor=16,
           note="every change above together"),
    WhatIf("past it: + 16-bit O(R) planes", state_interval=256, state_bytes=2, fold_qk=True,
           min_warps_per_sm=16, pipelined=True, walk_programs_min=4 * 132, walk_step_divisor=16, small_scale=0.5,
           note="the ceiling's changes, and the float32 q, k, q_hat, norms and dp planes stored in 16 bits "
                "(or recomputed): what bounds D = 64"),
    WhatIf("past it: + activations at the copy bound", state_interval=256, state_bytes=2, fold_qk=True,
           min_warps_per_sm=16, pipelined=True, walk_programs_min=4 * 132, walk_step_divisor=16, small_scale=0.5,
           act_at_copy_bound=True,
           note="and every D-wide tensor touched once per op (x, y forward; x, dy, dx backward): a design "
                "outside this family (no separate chunk-state pass over x / dy), the upper end of the model"),
    WhatIf("walk in the consumers", walk_in_consumers=True,
           note="the grouped pass's levels A and C folded away: the chunk-state pass walks each group of "
                "chunks in one program (writing the within-group prefixes and the group's total), level B "
                "walks the totals, and the kernels that read the states add the group's entry state "
                "(g^(64 j) H, shared by the group's chunks: cached); not in the issue's list"),
]


# --------------------------------------------------------------------------------------
# the document, the table
# --------------------------------------------------------------------------------------


def git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "kernels", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted kernel/op changes)" if dirty else "") if out.returncode == 0 \
            else None
    except (OSError, subprocess.SubprocessError):
        return None


def _whatif_row(p: Dict, w: WhatIf, per_launch: bool = True) -> Dict:
    return {"name": w.name, "note": w.note, "params": dataclasses.asdict(w),
            **{op: {k: v for k, v in d.items() if k in ("time_s", "fraction_of_copy_bound", "walk_share")}
               for op, d in p["ops"].items()},
            "launches": [{"phase": r["phase"], "kernel": r["traffic_name"] or r["kernel"], "time_s": r["time_s"],
                          "bound": r["bound"], "limit": r["limit"], "bytes_per_token": r["bytes_per_token"]}
                         for r in p["launches"] if r["bound"] != "-"] if per_launch else None}


def build(shapes: List[Shape], gate_doc: Dict, hw: GPU = H100, whatifs=WHATIFS) -> Dict:
    """The model's JSON document at ``shapes``: per shape, the recorded launches with their gate
    figures, the pricing, and the what-if rows (fwd, bwd, fwd_bwd time and fraction of the copy bound)."""
    idx = gate_index(gate_doc)
    out = []
    for S in shapes:
        launches = attach_gate(record(S), idx)
        base = price(S, launches, hw)
        # what-if rows per launch only at the longest sequence (the JSON stays small)
        base["whatifs"] = [_whatif_row(price(S, launches, hw, w), w, S.T == max(x.T for x in shapes))
                           for w in whatifs]
        out.append(base)
    gm = gate_doc.get("meta", {})
    return {"label": LABEL, "schema": "kop-triton-perf-model/1", "gpu": dataclasses.asdict(hw), "sources": SOURCES,
            "priced_commit": git_commit(), "created": time.strftime("%Y-%m-%d"),
            "gate": {k: gm.get(k) for k in ("date", "triton", "set", "argv")},
            "assumptions": __doc__.split("\n\n")[1:4], "shapes": out}


def _rounded(o):
    """Floats to 5 significant digits (a model's figures; keeps the committed JSON small)."""
    if isinstance(o, float):
        return float(f"{o:.5g}")
    if isinstance(o, dict):
        return {k: _rounded(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_rounded(v) for v in o]
    return o


def _us(t: float) -> str:
    return f"{t * 1e6:,.1f}"


def headline(doc: Dict) -> List[str]:
    """The table's reading at the longest sequence, per dtype and D, from the document's figures."""
    T = max(sh["shape"]["T"] for sh in doc["shapes"])
    L = [f"## Headline (T = {T:,}, B = 1; fraction of the copy bound, the model's)", ""]
    for sh in doc["shapes"]:
        s, o = sh["shape"], sh["ops"]
        if s["T"] != T:
            continue
        w = {x["name"]: x["fwd_bwd"]["fraction_of_copy_bound"] for x in sh["whatifs"]}
        ceiling = next(v for k, v in w.items() if k.startswith("all of the above"))
        past = [f"{k[len('past it: '):]} {v:.0%}" for k, v in w.items() if k.startswith("past it")]
        lat = [f"{r['traffic_name'] or r['kernel']} ({r['limit'].split(' (')[0]})" for r in sh["launches"]
               if r["bound"] == "latency"]
        L.append(f"- {s['dtype']} D = {s['D']}: fwd {o['fwd']['fraction_of_copy_bound']:.0%}, bwd "
                 f"{o['bwd']['fraction_of_copy_bound']:.0%}, fwd+bwd {o['fwd_bwd']['fraction_of_copy_bound']:.0%} "
                 f"(walk {o['fwd_bwd']['walk_share']:.0%} of it); latency-bound: {', '.join(lat) or 'none'}; "
                 f"this design family's ceiling {ceiling:.0%}; past it: {'; '.join(past)}.")
    L += ["", "The ceiling is the what-if with every change of issue 20 at once (states every 256 tokens in 16 bits, "
          "x read twice forward, >= 16 warps/SM with 2-stage loads in every tile kernel, a two-level walk); what "
          "bounds it is the D-wide activation passes (10.2 against the copy bound's 5 at D = 1024), the float32 "
          "O(R) planes at small D (1,440 B/token at R = 16, more than x at D = 64), and, under Little's law, the "
          "serial loop iterations of _bwd_dqk_kernel and _k2_dx_kernel (each waits a DRAM round trip). Going past "
          "it takes changes outside these parameters: fewer passes over x and dy (the reverse chunk-state pass "
          "fused into the dq/dk or dx pass, states recomputed rather than stored), 16-bit or recomputed q/k planes, "
          "and more bytes per loop iteration (larger tiles, deeper pipelines) in the two backward tile kernels."]
    return L


def markdown(doc: Dict) -> str:
    g = doc["gpu"]
    L = [f"# K2 fused mixer: performance model ({doc['label']})", "",
         f"Priced commit `{doc['priced_commit']}`, {doc['created']}; {g['name']} constants: copy "
         f"{g['copy_bw'] / 1e12:.1f} TB/s, DRAM latency {g['mem_latency'] * 1e9:.0f} ns, walk step "
         f"{g['step_latency'] * 1e6:.1f} us, tensor cores {g['tc_peak'] / 1e12:.0f} TFLOP/s, fp32 "
         f"{g['fp32_peak'] / 1e12:.0f} TFLOP/s, {g['sms']} SMs (sources in the JSON).  Registers, shared memory, warps, "
         f"stages and cp.async from the compile gate's JSON (Triton {doc['gate'].get('triton')}, sm_90); grids and "
         "constexprs recorded from the launchers; bytes from `benchmarks/traffic.py`.  "
         "`python -m benchmarks.perf_model` (see its docstring); GPU timings beside it: `benchmarks/model_check.py`.", "",
         "time = max(bytes / min(copy bandwidth, bytes in flight / latency), dependent steps x step latency, "
         "flops / peak); launch overheads not modelled.", "",
         *headline(doc), "",
         "## Per op", "",
         "| dtype | D | T | fwd us | fwd % copy bound | bwd us | bwd % | fwd+bwd us | fwd+bwd % | walk share | "
         "latency-bound launches |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for sh in doc["shapes"]:
        s, o = sh["shape"], sh["ops"]
        L.append(f"| {s['dtype']} | {s['D']} | {s['T']} | {_us(o['fwd']['time_s'])} | "
                 f"{o['fwd']['fraction_of_copy_bound']:.0%} | {_us(o['bwd']['time_s'])} | "
                 f"{o['bwd']['fraction_of_copy_bound']:.0%} | {_us(o['fwd_bwd']['time_s'])} | "
                 f"{o['fwd_bwd']['fraction_of_copy_bound']:.0%} | {o['fwd_bwd']['walk_share']:.0%} | "
                 f"{', '.join(o['fwd_bwd']['latency_bound']) or '-'} |")
    L += ["", "## What-if rows (parameters of the model, not kernel changes): fwd+bwd fraction of the copy bound", ""]
    names = [w["name"] for w in doc["shapes"][0]["whatifs"]]
    L += ["| dtype | D | T | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for sh in doc["shapes"]:
        s = sh["shape"]
        L.append(f"| {s['dtype']} | {s['D']} | {s['T']} | " + " | ".join(
            f"{w['fwd_bwd']['fraction_of_copy_bound']:.0%} ({_us(w['fwd_bwd']['time_s'])} us)" for w in sh["whatifs"])
            + " |")
    L += [""] + [f"- **{w['name']}**: {w['note']}" for w in doc["shapes"][0]["whatifs"] if w["note"]]
    big = [sh for sh in doc["shapes"] if sh["whatifs"][0]["launches"] is not None]
    if big:
        ws = big[0]["whatifs"]
        L += ["", f"### Per launch under each what-if, T = {big[0]['shape']['T']} (us, bound)", "",
              "| dtype | D | phase | kernel | " + " | ".join(w["name"] for w in ws) + " |",
              "|---|---|---|---|" + "---|" * len(ws)]
        ab = {"SMs covered (each at most 1/SMs of the copy bandwidth)": "SMs", "dependent steps": "steps", "one DRAM round trip": "lat", "copy bandwidth": "bw",
              "copy bandwidth (assumed)": "bw", "tensor-core peak": "flops", "CUDA-core fp32 peak": "flops",
              "folded away (what-if)": "gone"}
        for sh in big:
            s = sh["shape"]
            for i, r in enumerate(sh["whatifs"][0]["launches"]):
                L.append(f"| {s['dtype']} | {s['D']} | {r['phase']} | {r['kernel']} | " + " | ".join(
                    f"{_us(w['launches'][i]['time_s'])} {ab.get(w['launches'][i]['limit'], 'in flight')}"
                    for w in sh["whatifs"]) + " |")
    L += ["", "## Per launch", "",
          "| dtype | D | T | phase | kernel | B/token | dependent steps / loop iterations | programs | regs | "
          "warps/SM (limit) | "
          "in flight (KB) | GB/s | us | bound | % copy speed |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sh in doc["shapes"]:
        s = sh["shape"]
        for r in sh["launches"]:
            if r.get("programs"):
                L.append(f"| {s['dtype']} | {s['D']} | {s['T']} | {r['phase']} | {r['traffic_name'] or r['kernel']} | "
                         f"{r['bytes_per_token']:,.0f} | {r['dependent_steps']} / {r['iterations_per_program']} | "
                         f"{r['programs']:,} | "
                         f"{r['registers']} | {r['warps_per_sm']} ({r['occupancy_limiter']}) | "
                         f"{r['bytes_in_flight'] / 1024:,.0f} | {r['achievable_bw'] / 1e9:,.0f} | {_us(r['time_s'])} | "
                         f"{r['bound']}: {r['limit'].split(' (')[0]} | {r['fraction_of_copy_speed']:.0%} |")
            elif r["bound"] != "-":
                L.append(f"| {s['dtype']} | {s['D']} | {s['T']} | {r['phase']} | {r['kernel']} | "
                         f"{r['bytes_per_token']:,.0f} | - | - | - | - | - | - | {_us(r['time_s'])} | "
                         f"{r['bound']}: {r['limit']} | - |")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def gate_cases(shapes: List[Shape]):
    from kop_triton.gate import Case
    return [Case("k2", S.dtype, S.B, S.T, S.D, R=S.R, K=S.K) for S in shapes]


def write_gate(shapes: List[Shape], path: str, jobs: int = 1) -> Dict:
    """The compile gate (sm_90, the CI set's keys) on exactly the launches of ``shapes``, written as
    the gate's own JSON document."""
    import torch
    import triton

    from kop_triton import gate
    from kop_triton.kernels import report
    t0 = time.time()
    rows = gate.run_gate(gate_cases(shapes), ["sm_90"], jobs, exact=False)
    meta = {"date": time.strftime("%Y-%m-%d"), "triton": triton.__version__, "torch": torch.__version__,
            "set": "perf_model", "cases": len(shapes), "targets": ["sm_90"], "seconds": time.time() - t0,
            "machine": f"{os.cpu_count()}-core CPU", "argv": "benchmarks.perf_model --write-gate"}
    doc = {"meta": meta, "summary": report.summary(rows), "rows": rows, "limits": []}
    report._write_atomic(path, json.dumps(doc, indent=1))
    return doc


def shapes_of(Ds: str, Ts: str, dtypes: str, B: int = 1, R: int = 16, K: int = 8) -> List[Shape]:
    return [Shape(int(D), int(T), B, R, K, dt) for dt in dtypes.split(",") for D in Ds.split(",")
            for T in Ts.split(",")]


def main(argv=None) -> int:
    from kop_triton.cli import ArgumentParser
    ap = ArgumentParser(prog="python -m benchmarks.perf_model", description=__doc__.split("\n")[0])
    ap.add_argument("--D", default="64,256,1024")
    ap.add_argument("--T", default="2048,65536,1048576")
    ap.add_argument("--R", type=int, default=16)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    ap.add_argument("--gate-json", help="the compile gate's JSON (registers, smem, warps per specialisation)")
    ap.add_argument("--write-gate", help="run the gate (sm_90) on the model's launches and write its JSON here")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json", help="write the model here")
    ap.add_argument("--md", help="write the markdown table here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("run without TRITON_INTERPRET=1 (the launchers must pick the GPU's settings, as in the compile gate)")
    for dt in a.dtypes.split(","):
        if dt not in ("bf16", "fp16", "fp32"):
            ap.error(f"--dtypes: got {dt!r}; choose from bf16, fp16, fp32")
    shapes = shapes_of(a.D, a.T, a.dtypes, 1, a.R, a.K)
    if a.write_gate:
        doc = write_gate(shapes, a.write_gate, a.jobs)
        print(f"gate: {len(doc['rows'])} specialisations, summary {doc['summary']}", file=sys.stderr)
    path = a.gate_json or a.write_gate
    if not path:
        ap.error("give --gate-json FILE (the compile gate's JSON) or --write-gate FILE")
    try:
        with open(path) as f:
            gate_doc = json.load(f)
    except (OSError, ValueError) as e:
        ap.error(f"--gate-json {path}: cannot read it as JSON ({e})")
    try:
        doc = build(shapes, gate_doc, GPUS[a.gpu])
    except (MissingSpecs, ValueError) as e:
        ap.error(f"--gate-json {path}: {e}")
    text = json.dumps(_rounded(doc), separators=(",", ":"))
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    md = markdown(doc)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if not a.json and not a.md:
        sys.stdout.write(text + "\n")
    sys.stderr.write(md.split("## What-if")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
