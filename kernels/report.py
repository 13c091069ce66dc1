"""The offline compile gate: every Triton specialisation the public ops launch, compiled for real
GPU targets on a machine with no GPU and no CUDA driver, with ptxas's register, spill and
shared-memory report and the tensor-core instructions of the PTX.

    python -m kop_triton.kernels.report                    # the full workload, sm_80 / sm_90 / sm_100
    python -m kop_triton.kernels.report --set ci --targets sm_90 --json out.json --md out.md

How (no GPU needed):
  1. Workload.  The ops' Triton paths (``triton_decayed_scan``, ``triton_causal_conv``,
     ``triton_k2_mixer``: what ``decayed_scan`` / ``causal_conv`` / ``k2_mixer`` /
     ``KOperator`` run on CUDA after their argument checks) are called forward and backward on
     meta tensors (any size: T = 1M, D = 8192 cost nothing) or small CPU tensors (packed
     sequences, whose tables are built from data) inside ``kop_triton.kernels.launch.recording``:
     the launchers choose blocks, warps and flags exactly as on a GPU with 132 SMs, and every
     launch is recorded instead of run.  Run without TRITON_INTERPRET, so the launchers pick
     the GPU's operand modes (bf16 tensor-core dots, not the interpreter's emulation).
  2. Specialisation.  Each launch is bound with Triton's own binder for the target, giving the
     signature, constexprs and divisibility attributes the runtime would use; duplicates are
     compiled once.
  3. Compile with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, then
     ``ptxas -v`` (shipped in the Triton wheel) on the PTX: registers, spill stores / loads,
     shared memory.  The PTX is searched for MMA instructions (``mma.sync`` / ``wgmma`` /
     ``tcgen05.mma``), and for TF32 ones.
  4. The gate, per specialisation: it compiles; zero spill bytes; shared memory within the
     target's per-block limit; every kernel whose Triton IR multiplies 16-bit operands
     (``tt.dot`` on bf16 / f16) has MMA instructions; no TF32 anywhere.

What this cannot show: timings, occupancy effects of register counts, and anything about the
driver or a real launch; those need a GPU (``benchmarks/device_check.sh``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional

import torch
import triton

from .launch import Launch, recording


def _require_compiler() -> None:
    """The gate compiles; under the interpreter the kernels are not compilable objects."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile gate must run without TRITON_INTERPRET=1 "
                           "(run it as its own process: python -m kop_triton.kernels.report)")

TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
# Largest dynamic shared memory per block (opt-in), CUDA C Programming Guide, "Technical
# Specifications per Compute Capability": 163 KB on 8.0, 227 KB on 9.0 and 10.0.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
MMA_PATTERNS = (r"\bmma\.sync\.", r"\bwgmma\.mma_async\.", r"\btcgen05\.mma\.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------
# 1. workload
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    op: str                  # "scan" | "conv" | "k2"
    dtype: str               # fp32 | bf16 | fp16
    B: int
    T: int
    D: int
    R: int = 1               # scan / k2
    K: int = 1               # conv / k2
    per_channel: bool = False
    states: bool = False     # initial states given and final states asked for
    varlen: bool = False     # packed sequences (N of them) in a batch of one
    N: int = 3               # packed sequences (varlen)
    flat: bool = False       # every launch on its flat grid (launch.FORCE_FLAT: what sizes past
                             # CUDA's 65,535 programs on grid axis y or z run)

    def label(self) -> str:
        s = f"{self.op} {self.dtype} B={self.B} T={self.T} D={self.D}"
        if self.op != "conv":
            s += f" R={self.R}"
        if self.op != "scan":
            s += f" K={self.K}{' per-channel' if self.per_channel else ''}"
        return (s + (" states" if self.states else "") + (f" varlen N={self.N}" if self.varlen else "")
                + (" flat" if self.flat else ""))


def newest_workload() -> List[Case]:
    """The CI set of the second Triton gated (the newest release, in its own venv; ``--set
    newest``): every kernel x dtype x flag, at the tiles whose launch settings depend on the Triton
    version or the target (kernels/settings.py) or that spilled under Triton 3.9 before those
    settings -- R = 4 / 16 and 128 (either side of R = 32), D = 24 (partial channel blocks) and
    1024, states, packed sequences, the taps conv and the Toeplitz product, and ci's flat grids."""
    cases: List[Case] = []
    for dt in DTYPES:
        for R in (4, 128):
            cases.append(Case("scan", dt, 2, 2048, 24, R=R))
            cases.append(Case("k2", dt, 2, 2048, 24, R=R, K=8))
        cases.append(Case("scan", dt, 2, 2048, 1024, R=128))
        cases.append(Case("k2", dt, 2, 2048, 1024, R=128, K=8))
        cases.append(Case("scan", dt, 1, 300, 64, R=4, states=True, varlen=True))
        cases.append(Case("scan", dt, 1, 1 << 20, 1024, R=16, states=True))
        cases.append(Case("k2", dt, 1, 1 << 20, 1024, R=16, K=8, states=True))
        cases.append(Case("k2", dt, 1, 300, 64, R=16, K=8, per_channel=True, states=True, varlen=True))
        for K in (8, 4096):
            cases.append(Case("conv", dt, 2, 4096, 256, K=K))
            cases.append(Case("conv", dt, 2, 4096, 24, K=K, per_channel=True, states=True))
            cases.append(Case("conv", dt, 1, 300, 64, K=K, states=True, varlen=True))
        cases += _flat_cases(dt)
    return cases


def _flat_cases(dt: str) -> List[Case]:
    """The flat grids (sizes past CUDA's y / z limits), with the smallest and largest tiles; and
    the grouped state pass (sequences of over 8K tokens: kernels/scan.py ``pass_group``) over
    packed sequences on its flat grids."""
    cases: List[Case] = [Case("scan", dt, 1, 1 << 20, 64, R=4, states=True, varlen=True, flat=True)]
    for R in (4, 128):
        cases.append(Case("scan", dt, 2, 2048, 1024, R=R, states=True, flat=True))
        cases.append(Case("k2", dt, 2, 2048, 1024, R=R, K=8, states=True, flat=True))
        cases.append(Case("k2", dt, 1, 300, 64, R=R, K=8, per_channel=True, states=True, varlen=True,
                          flat=True))
    for K in (8, 4096):
        cases.append(Case("conv", dt, 2, 4096, 256, K=K, per_channel=K == 8, states=True, flat=True))
        cases.append(Case("conv", dt, 1, 300, 64, K=K, states=True, varlen=True, flat=True))
    return cases


def workload(which: str = "full") -> List[Case]:
    """The cases of the gate.  "full": every kernel x fp32 / bf16 / fp16 x R in {1, 4, 16, 64,
    128} x D in {1, 24, 64, 256, 1024, 4096} (8192 for the K2 mixer at T = 1M) x K from 1 to
    4096, shared and per-channel kernels, with and without states and packed sequences, forward
    and backward.  "ci": every kernel, dtype and flag with the smallest and the largest tiles the
    launchers pick (R in {4, 128}, D in {24, 1024}, the taps and the Toeplitz conv), sized for
    the 2-core CI machine."""
    if which == "newest":
        return newest_workload()
    full = which == "full"
    cases: List[Case] = []
    Rs = (1, 4, 16, 64, 128) if full else (4, 128)
    Ds = (1, 24, 64, 256, 1024, 4096) if full else (24, 1024)
    Ks = (1, 4, 8, 32, 33, 300, 4096) if full else (8, 4096)
    for dt in DTYPES:
        for R in Rs:
            for D in Ds:
                cases.append(Case("scan", dt, 2, 2048, D, R=R))
                cases.append(Case("k2", dt, 2, 2048, D, R=R, K=8))
            if full or R == 4:
                cases.append(Case("scan", dt, 1, 300, 64, R=R, states=True, varlen=True))
        cases.append(Case("scan", dt, 1, 1 << 20, 1024, R=16, states=True))
        cases.append(Case("k2", dt, 1, 1 << 20, 8192 if full else 1024, R=16, K=8, states=True))
        for K in Ks + (() if full else (1,)):
            for D in ((1, 24, 64, 256, 4096) if full else (24, 256)):
                if full or K != 1:
                    cases.append(Case("conv", dt, 2, 4096, D, K=K))
                    cases.append(Case("conv", dt, 2, 4096, D, K=K, per_channel=True, states=True))
            cases.append(Case("conv", dt, 1, 300, 64, K=K, states=True, varlen=True))
            cases.append(Case("k2", dt, 1, 300, 64, R=16, K=K, per_channel=K % 2 == 0, states=True,
                              varlen=True))
        cases += _flat_cases(dt)
    return cases


def limit_cases() -> List[Case]:
    """Sizes at CUDA's grid limits (``launch.GRID_LIMITS``: 65,535 programs on axes y and z), each
    op forward and backward, fp32 and bf16: one sequence of 16M and of 64M tokens, 64M tokens
    packed in 3 sequences, 100,000 packed sequences, a batch of B = 100,000, D = 8192.  Recorded
    only (``check_limits``), not compiled: their specialisations are the workload's."""
    cases: List[Case] = []
    for dt in ("fp32", "bf16"):
        for T in (1 << 24, 1 << 26):
            cases += [Case("scan", dt, 1, T, 64, R=16, states=True), Case("conv", dt, 1, T, 64, K=8, states=True),
                      Case("k2", dt, 1, T, 64, R=16, K=8, states=True)]
        for N, T in ((3, 1 << 26), (100_000, 100_000 * 64)):
            cases += [Case("scan", dt, 1, T, 64, R=16, states=True, varlen=True, N=N),
                      Case("conv", dt, 1, T, 64, K=8, states=True, varlen=True, N=N),
                      Case("k2", dt, 1, T, 64, R=16, K=8, states=True, varlen=True, N=N)]
        cases += [Case("scan", dt, 100_000, 256, 64, R=16, states=True),
                  Case("conv", dt, 100_000, 256, 64, K=8, per_channel=True, states=True),
                  Case("k2", dt, 100_000, 256, 64, R=16, K=8, states=True),
                  Case("scan", dt, 1, 1 << 20, 8192, R=128, states=True),
                  Case("conv", dt, 1, 1 << 20, 8192, K=4096, states=True),
                  Case("k2", dt, 1, 1 << 20, 8192, R=128, K=8, per_channel=True, states=True)]
    return cases


def check_limits(cases: Optional[List[Case]] = None) -> List[Dict]:
    """Record every launch of ``cases`` (default: ``limit_cases()``): ``launch`` raises on a grid
    over CUDA's limits.  -> one row per case: its largest grid per axis, or the error."""
    rows = []
    for c in limit_cases() if cases is None else cases:
        row = {"case": c.label(), "op": c.op, "B": c.B, "T": c.T, "D": c.D,
               "N": c.N if c.varlen else c.B, "error": None}
        try:
            launches = run_case(c)
            big = max(launches, key=lambda ln: max(ln.grid))
            row["launches"] = len(launches)
            row["largest_grid"] = list(big.grid)
            row["largest_grid_kernel"] = big.name
            row["max_axis_yz"] = max((g for ln in launches for g in ln.grid[1:]), default=1)
        except Exception as e:  # a launch over the limits is a result of the check
            row["error"] = f"{type(e).__name__}: {e}"[-1000:]
        rows.append(row)
    return rows


def _inputs(c: Case):
    # meta tensors (nothing is allocated: any size); packed sequences' offsets on the CPU, since
    # the launchers build their tables from them
    dev = "meta"
    dt = DTYPES[c.dtype]
    f32 = torch.float32
    N = c.N if c.varlen else c.B
    mk = lambda *s, dtype=f32: torch.empty(*s, dtype=dtype, device=dev).requires_grad_()  # noqa: E731
    cu = None
    if c.varlen:
        if c.N == 3:
            cuts = [0, c.T // 5, c.T // 5 + 1 + c.T // 3, c.T]
        else:   # N sequences of about T / N tokens, the first ones one token longer
            q, r = divmod(c.T, c.N)
            cuts = [0]
            for i in range(c.N):
                cuts.append(cuts[-1] + q + (i < r))
        cu = torch.tensor(cuts, dtype=torch.int32)
    return dev, dt, N, mk, cu


def run_case(c: Case, arch: Optional[int] = None) -> List[Launch]:
    """Forward and backward of one case through the ops' Triton paths, launches recorded."""
    from . import launch as launch_mod
    dev, dt, N, mk, cu = _inputs(c)
    flat, launch_mod.FORCE_FLAT = launch_mod.FORCE_FLAT, c.flat
    try:
        return _record(c, arch, dev, dt, N, mk, cu)
    finally:
        launch_mod.FORCE_FLAT = flat


def _record(c: Case, arch, dev, dt, N, mk, cu) -> List[Launch]:
    from kop_triton.ops.conv import triton_causal_conv
    from kop_triton.ops.k2 import triton_k2_mixer
    from kop_triton.ops.scan import triton_decayed_scan
    with recording(arch=arch) as rec:
        if c.op == "scan":
            q, k, v = mk(c.B, c.T, c.R, dtype=dt), mk(c.B, c.T, c.R, dtype=dt), mk(c.B, c.T, c.D, dtype=dt)
            gamma = mk(c.R)
            h0 = mk(N, c.R, c.D) if c.states else None
            outs = triton_decayed_scan(q, k, v, gamma, initial_state=h0, output_final_state=c.states,
                                       cu_seqlens=cu)
            ins = [t for t in (q, k, v, gamma, h0) if t is not None]
        elif c.op == "conv":
            x = mk(c.B, c.T, c.D, dtype=dt)
            w = mk(c.D, c.K) if c.per_channel else mk(c.K)
            h0 = mk(N, c.K - 1, c.D) if c.states else None
            outs = triton_causal_conv(x, w, initial_state=h0, output_final_state=c.states, cu_seqlens=cu)
            ins = [t for t in (x, w, h0) if t is not None]
        else:
            x = mk(c.B, c.T, c.D, dtype=dt)
            u, v, alpha, gamma = mk(c.D, c.R), mk(c.D, c.R), mk(c.R), mk(c.R)
            w = mk(c.D, c.K) if c.per_channel else mk(c.K)
            gl = mk(())
            st = (mk(N, c.R, c.D), mk(N, c.K - 1, c.D)) if c.states else None
            y, fin = triton_k2_mixer(x, u, v, alpha, gamma, w, gl, initial_state=st,
                                     output_final_state=c.states, cu_seqlens=cu)
            outs = (y,) + (tuple(fin) if fin is not None else ())
            ins = [t for t in (x, u, v, alpha, gamma, w, gl) + (st or ()) if t is not None]
        outs = [o for o in outs if o is not None and o.requires_grad]
        torch.autograd.grad(outs, ins, [torch.ones_like(o) for o in outs], allow_unused=True)
    return rec.launches


# --------------------------------------------------------------------------------------
# 2. specialisations
# --------------------------------------------------------------------------------------


class Ptr:
    """Stand-in for a tensor argument: its dtype, 16-byte aligned (as every CUDA allocation)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0


@dataclasses.dataclass
class Spec:
    kernel: str                      # module:qualname
    kwargs: Dict                     # tensors replaced by Ptr
    key: str                         # Triton's cache key for this target
    config: str                      # constexprs and launch options, readable
    dtype: str
    cases: List[str]


def _kernel_fn(path: str):
    mod, name = path.split(":")
    return getattr(__import__(mod, fromlist=[name]), name)


def _binder(fn, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def _portable(v):
    return Ptr(v.dtype) if isinstance(v, torch.Tensor) else v


def _dtype_label(kwargs) -> str:
    ptrs = sorted({str(v.dtype).replace("torch.", "") for v in kwargs.values() if isinstance(v, Ptr)})
    return "/".join(ptrs)


def specializations(cases: List[Case], arch: int, exact: bool = True) -> List[Spec]:
    """The distinct specialisations the cases launch, for sm_<arch>.  ``exact``: as Triton's cache
    tells them apart (integer arguments' divisibility by 16 included); otherwise one per kernel,
    constexpr values, launch options and pointer dtypes (the CI gate: integer divisibility
    changes vector widths, not which tiles live in registers)."""
    _require_compiler()
    specs: Dict[str, Spec] = {}
    binders = {}
    for c in cases:
        for ln in run_case(c, arch):
            fn = ln.kernel
            path = f"{fn.fn.__module__}:{fn.fn.__qualname__}"
            if path not in binders:
                binders[path] = _binder(fn, arch)
            backend, binder = binders[path]
            kw = {k: _portable(v) for k, v in ln.kwargs.items()}
            _, spec, opts = binder(**kw)
            cexpr = {p.name: kw[p.name] for p in fn.params if p.is_constexpr}
            ints = {p.name: s for p, s in zip(fn.params, spec)
                    if not p.is_constexpr and s[0] == "constexpr"}            # runtime-specialised (== 1, None)
            opt = {k: v for k, v in kw.items() if k in ("num_warps", "num_stages")}
            cfg = ", ".join(f"{k}={v}" for k, v in {**cexpr, **opt}.items())
            if ints:
                cfg += "; const " + ", ".join(f"{k}={v[1]}" for k, v in ints.items())
            key = f"{path}|{spec}|{sorted(opts.items())}" if exact else f"{path}|{cfg}|{_dtype_label(kw)}"
            if key not in specs:
                specs[key] = Spec(path, kw, key, cfg, _dtype_label(kw), [])
            if len(specs[key].cases) < 3:
                specs[key].cases.append(c.label())
    return list(specs.values())


# --------------------------------------------------------------------------------------
# 3. compile + ptxas
# --------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> Dict[str, int]:
    """Registers, spill store / load bytes and static shared memory from ``ptxas -v``."""
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in _PTXAS_SPILL.findall(log)]
    smem = [int(m) for m in _PTXAS_SMEM.findall(log)]
    if not regs:
        raise ValueError(f"no register report in the ptxas log:\n{log}")
    return {"registers": max(regs), "spill_stores": sum(a for a, _ in spills),
            "spill_loads": sum(b for _, b in spills), "ptxas_smem": max(smem) if smem else 0}


def count_mma(ptx: str) -> Dict[str, int]:
    lines = [ln for ln in ptx.splitlines() if any(re.search(p, ln) for p in MMA_PATTERNS)]
    return {"mma": len(lines), "tf32_mma": sum(".tf32" in ln for ln in lines)}


_TTIR_DOT = re.compile(r"tt\.dot\b[^\n]*")


def dots_16bit(ttir: str) -> bool:
    """Does the Triton IR multiply 16-bit operands (a tt.dot on bf16 / f16 tensors)?"""
    return any(re.search(r"x(bf16|f16)>", ln) for ln in _TTIR_DOT.findall(ttir))


def ptxas(ptx: str, arch: int, backend=None, options=None) -> str:
    """``ptxas -v`` on ``ptx`` for sm_<arch> -> its log.  With Triton's ``backend`` and ``options``:
    through the backend's own ``make_cubin``, i.e. with the flags that Triton version passes (they
    change between releases: 3.9 adds ``--regAllocOptLevel=2``, under which some kernels spill that
    do not without it); otherwise (or if that is not callable) plain ``-lineinfo -v``."""
    if backend is not None:
        log = io.StringIO()
        knobs = triton.knobs.nvidia
        dump, knobs.dump_ptxas_log = knobs.dump_ptxas_log, True
        try:
            with contextlib.redirect_stdout(log):
                backend.make_cubin(ptx, {}, options, arch)
        except TypeError:               # another make_cubin signature: fall back to our own command
            pass
        finally:
            knobs.dump_ptxas_log = dump
        if _PTXAS_REGS.search(log.getvalue()):
            return log.getvalue()
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                              src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out.stderr + out.stdout


def compile_one(kernel_path: str, kwargs: Dict, arch: int, on_device: bool = False) -> Dict:
    """Compile one specialisation for sm_<arch> -> row of measurements (or the error).
    ``on_device`` (a CUDA machine of that arch): also load the binary through the driver and
    record the driver's own register and spill counts beside ptxas's."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    _require_compiler()
    fn = _kernel_fn(kernel_path)
    backend, binder = _binder(fn, arch)
    t0 = time.time()
    try:
        bound, spec, opts = binder(**kwargs)
        options, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        log = io.StringIO()
        knobs = triton.knobs.nvidia
        dump, knobs.dump_ptxas_log = knobs.dump_ptxas_log, True     # Triton's own `ptxas -v` run, printed
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(io.StringIO()):
                k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                   options=options.__dict__)
        finally:
            knobs.dump_ptxas_log = dump
        text = log.getvalue()
        # a binary from Triton's cache ran no ptxas: run it on the cached PTX, as Triton would
        row = parse_ptxas(text if _PTXAS_REGS.search(text) else ptxas(k.asm["ptx"], arch, backend, options))
        row.update(count_mma(k.asm["ptx"]))
        row["dots_16bit"] = dots_16bit(k.asm["ttir"])
        row["smem"] = max(int(k.metadata.shared), row["ptxas_smem"])
        row["num_warps"] = int(k.metadata.num_warps)
        row["num_stages"] = int(k.metadata.num_stages)
        row["error"] = None
        if on_device:
            k._init_handles()
            row["device_registers"], row["device_spills"] = int(k.n_regs), int(k.n_spills)
    except Exception as e:  # a compile error is a result of the gate, not a crash of it
        msg = f"{type(e).__name__}: {e}"
        row = {"error": msg[-3000:]}
    row["seconds"] = round(time.time() - t0, 2)
    return row


def problems(row: Dict, arch: int) -> List[str]:
    """Why a compiled specialisation fails the gate (empty: it passes)."""
    if row.get("error"):
        return ["does not compile"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["smem"] > SMEM_LIMIT[arch]:
        out.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[arch]} B")
    if row["dots_16bit"] and row["mma"] == 0:
        out.append("16-bit dot without MMA instructions")
    if row["tf32_mma"]:
        out.append(f"{row['tf32_mma']} TF32 MMA instructions")
    return out


def _job(args):
    return compile_one(*args)


def gate_pool(jobs: int) -> ProcessPoolExecutor:
    """The gate's worker pool: spawned, never forked.  With ``--device`` each worker loads its
    binaries through the CUDA driver, and a child forked from a parent that touched CUDA (even
    ``torch.cuda.is_available()``) cannot initialise it: every row would read "does not
    compile".  Spawned workers start clean (a few seconds of imports each, on any machine)."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint)


def _ignore_sigint():
    """Workers leave a Ctrl-C to the parent (one line, exit 130) instead of each printing a traceback."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class UnknownKernel(ValueError):
    """A ``kernel`` filter part that names no kernel the workload launches."""


def run_gate(cases: List[Case], targets: List[str], jobs: int = 1, kernel: Optional[str] = None,
             exact: bool = True, on_device: bool = False) -> List[Dict]:
    """Compile every specialisation of ``cases`` for each target (only kernels whose name
    contains one of the comma-separated parts of ``kernel``, when given) -> one row per
    (target, specialisation).  Raises ``UnknownKernel`` when a part of ``kernel`` matches no
    kernel of the workload, ValueError when ``targets`` is empty or unknown."""
    if not targets:
        raise ValueError(f"no target given; choose from {', '.join(TARGETS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    parts = None if kernel is None else [k.strip() for k in kernel.split(",") if k.strip()]
    if parts == []:
        raise UnknownKernel(f"{kernel!r} names no kernel")
    rows = []
    work = []
    for t in targets:
        arch = TARGETS[t]
        specs = specializations(cases, arch, exact)
        if parts is not None:
            names = sorted({s.kernel.split(":")[1] for s in specs})
            bad = [k for k in parts if not any(k in s.kernel for s in specs)]
            if bad:
                raise UnknownKernel(f"{', '.join(repr(k) for k in bad)} matches no kernel of the workload "
                                    f"(for {t}); its kernels: {', '.join(names)}")
        for s in specs:
            if parts is None or any(k in s.kernel for k in parts):
                work.append((t, arch, s))
    args = [(s.kernel, s.kwargs, arch, on_device) for _, arch, s in work]
    if jobs > 1 and len(args) > 1:
        with gate_pool(min(jobs, len(args))) as ex:
            results = list(ex.map(_job, args))
    else:
        results = [_job(a) for a in args]
    for (t, arch, s), r in zip(work, results):
        rows.append({"target": t, "kernel": s.kernel.split(":")[1], "dtype": s.dtype, "config": s.config,
                     "cases": s.cases, **r, **_verdict(r, arch, s.config)})
    return rows


# --------------------------------------------------------------------------------------
# 4. report
# --------------------------------------------------------------------------------------


def _verdict(row: Dict, arch: int, config: str) -> Dict:
    """{"problems": what fails the gate, "notes": what is reported only}.  The flat grids (FLAT=True:
    what a launch runs past CUDA's 65,535 programs on axis y or z, ``launch.grid_of``) are held to
    every rule but spills, which they report: their index decode moves ptxas's register choices
    (4-32 B in 5-10 specialisations per target, gate 2026-12-06), not yet tuned per setting."""
    probs = problems(row, arch)
    if "FLAT=True" not in config:
        return {"problems": probs, "notes": []}
    return {"problems": [p for p in probs if not p.startswith("spills")],
            "notes": [p for p in probs if p.startswith("spills")]}


def summary(rows: List[Dict]) -> List[Dict]:
    out = []
    for t in sorted({r["target"] for r in rows}):
        rs = [r for r in rows if r["target"] == t]
        ok = [r for r in rs if not r.get("error")]
        nat = [r for r in ok if "FLAT=True" not in r.get("config", "")]
        spills = [r["spill_stores"] + r["spill_loads"] for r in nat]
        flat = [r["spill_stores"] + r["spill_loads"] for r in ok if "FLAT=True" in r.get("config", "")]
        out.append({"target": t, "specializations": len(rs), "compile_errors": len(rs) - len(ok),
                    "spilling": sum(s > 0 for s in spills), "largest_spill_bytes": max(spills, default=0),
                    "flat_specializations": len(flat), "flat_spilling": sum(s > 0 for s in flat),
                    "flat_largest_spill_bytes": max(flat, default=0),
                    "max_registers": max((r["registers"] for r in ok), default=0),
                    "max_smem": max((r["smem"] for r in ok), default=0),
                    "failing": sum(bool(r["problems"]) for r in rs)})
    return out


def markdown(rows: List[Dict], meta: Dict, limits: Optional[List[Dict]] = None) -> str:
    lines = [f"# Offline compile report: {meta['date']}", "",
             f"Triton {meta['triton']}, torch {meta['torch']}, workload `{meta['set']}` "
             f"({meta['cases']} cases), targets {', '.join(meta['targets'])}; compiled on {meta['machine']} "
             f"with no GPU (`python -m kop_triton.kernels.report {meta['argv']}`, {meta['seconds']:.0f} s).",
             "Registers, spills and shared memory are ptxas's own report for the target; MMA counts "
             "the PTX's `mma.sync` / `wgmma.mma_async` / `tcgen05.mma` lines.", "",
             "Spills are counted on the natural grids; the flat grids (FLAT=True, past CUDA's 65,535 programs on "
             "grid axis y or z) are reported apart: every other rule holds for them, spills are reported only.", "",
             "| target | specialisations | compile errors | spilling | largest spill (B) | flat: specialisations / "
             "spilling / largest (B) | max registers | max smem (B) | failing the gate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        lines.append(f"| {s['target']} | {s['specializations']} | {s['compile_errors']} | {s['spilling']} | "
                     f"{s['largest_spill_bytes']} | {s['flat_specializations']} / {s['flat_spilling']} / "
                     f"{s['flat_largest_spill_bytes']} | {s['max_registers']} | {s['max_smem']} | {s['failing']} |")
    lines += ["", "| target | kernel | pointers | config | regs | spill st/ld (B) | smem (B) | MMA | "
              "gate | e.g. case |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["target"], r["kernel"], r["dtype"], r["config"])):
        if r.get("error"):
            lines.append(f"| {r['target']} | {r['kernel']} | {r['dtype']} | {r['config']} | - | - | - | - | "
                         f"**does not compile** | {r['cases'][0]} |")
            continue
        gate = "ok" if not r["problems"] else "**" + "; ".join(r["problems"]) + "**"
        if r.get("notes"):
            gate += " (flat grid: " + "; ".join(r["notes"]) + ")"
        if "device_registers" in r:
            gate += f" (driver: {r['device_registers']} regs, {r['device_spills']} spills)"
        lines.append(f"| {r['target']} | {r['kernel']} | {r['dtype']} | {r['config']} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['smem']} | {r['mma']} | {gate} | "
                     f"{r['cases'][0]} |")
    if limits:
        lines += ["", "## Launch limits", "",
                  "Every launch of these sizes recorded on meta tensors (`check_limits`) and held against CUDA's "
                  "grid limits (axis x < 2^31, y and z <= 65,535 programs):", "",
                  "| case | launches | largest grid (kernel) | largest y / z | verdict |", "|---|---|---|---|---|"]
        for r in limits:
            if r["error"]:
                lines.append(f"| {r['case']} | - | - | - | **{r['error'][:200]}** |")
            else:
                lines.append(f"| {r['case']} | {r['launches']} | {r['largest_grid']} ({r['largest_grid_kernel']}) | "
                             f"{r['max_axis_yz']} | ok |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    from kop_triton.cli import ArgumentParser          # the tools' one-line usage errors, exit status 2
    ap = ArgumentParser(prog="python -m kop_triton.kernels.report", description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=("full", "ci", "newest"), default="full",
                    help="workload (default: full; newest: the CI set of the second Triton gated)")
    ap.add_argument("--targets", default="sm_80,sm_90,sm_100",
                    help="comma-separated, of " + ", ".join(TARGETS) + " (default: all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--md", help="write the markdown report here")
    ap.add_argument("--kernel", help="only kernels whose name contains one of these (comma-separated)")
    ap.add_argument("--no-limits", action="store_true",
                    help="skip the launch-limit sizes (check_limits: recorded, not compiled)")
    ap.add_argument("--device", action="store_true",
                    help="on a CUDA GPU: also load each binary and record the driver's register / spill counts")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        ap.error(f"--targets: got {args.targets!r}, no target; give one or more of {', '.join(TARGETS)}, "
                 "comma-separated")
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        ap.error(f"--targets: unknown {bad}; choose from {list(TARGETS)}")
    if args.jobs < 1:
        ap.error(f"--jobs: got {args.jobs}; give 1 or more parallel compiles")
    if args.kernel is not None and not any(k.strip() for k in args.kernel.split(",")):
        ap.error(f"--kernel: got {args.kernel!r}, no kernel name; give part of a kernel's name, e.g. _k2_qk")
    for flag_, path in (("--json", args.json), ("--md", args.md)):
        if path is not None:   # checked before the compiles (minutes), not after them
            problem = _unwritable(path)
            if problem:
                ap.error(f"{flag_} {path}: {problem}")
    t0 = time.time()
    cases = workload(args.set)
    # (the workers are spawned, not forked: this CUDA query in the parent cannot break them)
    if args.device and not torch.cuda.is_available():
        ap.error("--device needs a CUDA GPU")
    try:
        rows = run_gate(cases, targets, args.jobs, args.kernel, exact=args.set == "full", on_device=args.device)
    except UnknownKernel as e:
        ap.error(f"--kernel: {e}")
    limits = [] if args.no_limits else check_limits()
    meta = {"date": time.strftime("%Y-%m-%d"), "triton": triton.__version__, "torch": torch.__version__,
            "set": args.set, "cases": len(cases), "targets": targets, "seconds": time.time() - t0,
            "machine": f"{os.cpu_count()}-core CPU", "argv": " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        if args.json:
            _write_atomic(args.json, json.dumps({"meta": meta, "summary": summary(rows), "rows": rows,
                                                 "limits": limits}, indent=1))
        if args.md:
            _write_atomic(args.md, markdown(rows, meta, limits))
    except OSError as e:
        print(f"{ap.prog}: error: cannot write the report: {e}", file=sys.stderr)
        return 2
    for s in summary(rows):
        print(json.dumps(s))
    failing = [r for r in rows if r["problems"]]
    for r in failing:
        print(f"FAIL {r['target']} {r['kernel']} [{r['dtype']}; {r['config']}]: {'; '.join(r['problems'])}"
              f"  (e.g. {r['cases'][0]})" + (f"\n    {r['error'].splitlines()[-1]}" if r.get("error") else ""))
    over = [r for r in limits if r["error"]]
    for r in over:
        print(f"FAIL launch limits {r['case']}: {r['error']}")
    if limits:
        print(f"launch limits: {len(limits) - len(over)} of {len(limits)} sizes launch within CUDA's grid limits")
    print(f"gate: {len(rows) - len(failing)} specialisations pass, {len(failing)} fail")
    if not rows:
        print("gate: FAIL, no specialisation was compiled (nothing matched the set, --kernel and --targets): "
              "a gate that checked nothing does not pass")
        return 1
    return 1 if failing or over else 0


def _unwritable(path) -> str:
    """Why ``path`` cannot be written as a report file, or "" when it can."""
    p = os.path.abspath(path)
    if os.path.isdir(p):
        return "is a directory; give a file name"
    parent = os.path.dirname(p)
    if not os.path.isdir(parent):
        return f"its directory {parent} does not exist"
    if not os.access(parent, os.W_OK) or (os.path.exists(p) and not os.access(p, os.W_OK)):
        return "is not writable here"
    return ""


def _write_atomic(path, text: str) -> None:
    """``text`` into ``path`` through a temp file and a rename: never a half-written report."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("python -m kop_triton.kernels.report: interrupted (Ctrl-C); no report written", file=sys.stderr)
        sys.exit(130)
