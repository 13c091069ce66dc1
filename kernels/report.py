"""The offline compile gate's kernel-layer half: one recorded launch's specialisation for a GPU
target, compiled with Triton's real compiler on a machine with no GPU and no CUDA driver, with
ptxas's register, spill and shared-memory report and the tensor-core instructions of the PTX, the
gate's verdict per specialisation and its report.  It imports no op: the workload (the public ops'
launches, recorded) and the command line are the tool ``kop_triton.gate``.

    python -m kop_triton.kernels.report                    # the full workload, sm_80 / sm_90 / sm_100
    python -m kop_triton.kernels.report --set ci --targets sm_90 --json out.json --md out.md

(that command is ``python -m kop_triton.gate``: this module runs its command line when run as a
script.)  How (no GPU needed):
  1. Workload (``kop_triton.gate``).  The ops' Triton paths (``triton_decayed_scan``,
     ``triton_causal_conv``, ``triton_k2_mixer``: what ``decayed_scan`` / ``causal_conv`` /
     ``k2_mixer`` / ``KOperator`` run on CUDA after their argument checks) are called forward and
     backward on meta tensors (any size: T = 1M, D = 8192 cost nothing) or small CPU tensors (packed
     sequences, whose tables are built from data) inside ``kop_triton.kernels.launch.recording``:
     the launchers choose blocks, warps and flags exactly as on a GPU with 132 SMs, and every
     launch is recorded instead of run.  Run without TRITON_INTERPRET, so the launchers pick
     the GPU's operand modes (bf16 tensor-core dots, not the interpreter's emulation).
  2. Specialisation (``launch_spec``).  Each launch is bound with Triton's own binder for the
     target, giving the signature, constexprs and divisibility attributes the runtime would use;
     duplicates are compiled once.
  3. Compile with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, then
     ``ptxas -v`` (shipped in the Triton wheel) on the PTX: registers, spill stores / loads,
     shared memory.  The PTX is searched for MMA instructions (``mma.sync`` / ``wgmma`` /
     ``tcgen05.mma``), for TF32 ones and for ``cp.async`` (pipelined loads).
  4. The gate, per specialisation: it compiles; zero spill bytes; shared memory within the
     target's per-block limit; every kernel whose Triton IR multiplies 16-bit operands
     (``tt.dot`` on bf16 / f16) has MMA instructions; no TF32 anywhere.

What this cannot show: timings, occupancy effects of register counts, and anything about the
driver or a real launch; those need a GPU (``benchmarks/device_check.sh``; a model of them:
``benchmarks/perf_model.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional

import torch
import triton

from .launch import Launch


def _require_compiler(tool: str = "the compile gate", command: str = "python -m kop_triton.kernels.report") -> None:
    """The gate compiles (and the tools that record launches as it does need the same kernels);
    under the interpreter the kernels are not compilable objects."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(f"{tool} must run without TRITON_INTERPRET=1 (run it as its own process: {command})")

TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
# Largest dynamic shared memory per block (opt-in), CUDA C Programming Guide, "Technical
# Specifications per Compute Capability": 163 KB on 8.0, 227 KB on 9.0 and 10.0.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
MMA_PATTERNS = (r"\bmma\.sync\.", r"\bwgmma\.mma_async\.", r"\btcgen05\.mma\.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def launch_spec(ln: Launch, arch: int, exact: bool = False, binders: Optional[Dict] = None) -> Spec:
    """The specialisation one recorded launch compiles to for sm_<arch> (no cases yet): its
    ``config`` and ``dtype`` are the gate rows' ``config`` / ``dtype`` columns, so a launch is
    joined to its row of the gate's JSON by (kernel, dtype, config) (benchmarks/perf_model.py)."""
    _require_compiler()
    binders = {} if binders is None else binders
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
    opt = {k: v for k, v in kw.items() if k in ("num_warps", "num_stages", "maxnreg")}
    cfg = ", ".join(f"{k}={v}" for k, v in {**cexpr, **opt}.items())
    if ints:
        cfg += "; const " + ", ".join(f"{k}={v[1]}" for k, v in ints.items())
    key = f"{path}|{spec}|{sorted(opts.items())}" if exact else f"{path}|{cfg}|{_dtype_label(kw)}"
    return Spec(path, kw, key, cfg, _dtype_label(kw), [])


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


def count_cp_async(ptx: str) -> int:
    """PTX lines issuing asynchronous global-to-shared copies (``cp.async`` / ``cp.async.bulk``,
    the TMA): loads kept in flight across a pipelined loop's stages (num_stages > 1)."""
    return sum(1 for ln in ptx.splitlines() if re.search(r"\bcp\.async\.(ca|cg|bulk)\b", ln))


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
        row["cp_async"] = count_cp_async(k.asm["ptx"])
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
    # ``python -m kop_triton.kernels.report`` (the documented command, kept): the command line lives
    # with the workload in the tool layer
    from kop_triton.gate import run_cli
    run_cli()
