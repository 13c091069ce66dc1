"""The offline compile gate, as a tool: its workload (the public ops' Triton paths, forward and
backward, with every launch recorded on meta or small CPU tensors), the distinct specialisations
those launches compile to, the run over GPU targets and the command line.  The compiler, ptxas and
report pieces it drives are ``kop_triton.kernels.report`` (the kernel layer, which imports no op);
this module imports the ops, so it lives above them.

    python -m kop_triton.kernels.report                    # the full workload, sm_80 / sm_90 / sm_100
    python -m kop_triton.kernels.report --set ci --targets sm_90 --json out.json --md out.md
    python -m kop_triton.gate ...                          # the same command line

See ``kop_triton.kernels.report`` for how a specialisation is compiled and judged.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import triton

from kop_triton.kernels.launch import Launch, recording
from kop_triton.kernels.report import (DTYPES, TARGETS, Spec, _job, _require_compiler, _verdict, _write_atomic,
                                       gate_pool, launch_spec, markdown, summary)

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
        cases.append(Case("k2", dt, 1, 1 << 20, 1024, R=16, K=8))          # the register-capped settings
        cases.append(Case("k2", dt, 1, 300, 64, R=16, K=8, per_channel=True, states=True, varlen=True))
        for K in (8, 4096):
            cases.append(Case("conv", dt, 2, 4096, 256, K=K))
            cases.append(Case("conv", dt, 2, 4096, 24, K=K, per_channel=True, states=True))
            cases.append(Case("conv", dt, 1, 300, 64, K=K, states=True, varlen=True))
        cases += _flat_cases(dt) + _edge_cases(dt)
    return cases


def _edge_cases(dt: str) -> List[Case]:
    """R = 32 (the largest R of the small-R tiles, BR = 32) and D = 24 on packed sequences, where
    settings tuned at R = 4 / 16 and 128 spilled (gate 12-06, found by the fold's cases): scan and
    K2, a plain batch and packed sequences at T = 1M (the grouped pass, the folded projection)."""
    return [Case("scan", dt, 2, 2048, 24, R=32),
            Case("scan", dt, 1, 1 << 20, 24, R=32, states=True, varlen=True),
            Case("k2", dt, 2, 2048, 1024, R=32, K=8),
            Case("k2", dt, 1, 1 << 20, 24, R=32, K=8, states=True, varlen=True),
            Case("k2", dt, 1, 1 << 20, 24, R=16, K=8, states=True, varlen=True)]


def _flat_cases(dt: str) -> List[Case]:
    """The flat grids (sizes past CUDA's y / z limits), with the smallest and largest tiles; and
    the grouped state pass (sequences of over 8K tokens: kernels/scan.py ``pass_group``) over
    packed sequences on its flat grids."""
    cases: List[Case] = [Case("scan", dt, 1, 1 << 20, 64, R=4, states=True, varlen=True, flat=True),
                         # the K2 forward's folded projection (kernels/k2.py fold_qk: >= 132 chunks)
                         # on packed sequences, flat and not
                         Case("k2", dt, 1, 1 << 20, 64, R=4, K=8, states=True, varlen=True, flat=True),
                         Case("k2", dt, 1, 1 << 20, 64, R=16, K=8, per_channel=True, states=True, varlen=True)]
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
        # no states, R and D multiples of 16: the register-capped settings of _k2_out / _k2_dx (bf16)
        cases.append(Case("k2", dt, 1, 1 << 20, 1024, R=16, K=8))
        for K in Ks + (() if full else (1,)):
            for D in ((1, 24, 64, 256, 4096) if full else (24, 256)):
                if full or K != 1:
                    cases.append(Case("conv", dt, 2, 4096, D, K=K))
                    cases.append(Case("conv", dt, 2, 4096, D, K=K, per_channel=True, states=True))
            cases.append(Case("conv", dt, 1, 300, 64, K=K, states=True, varlen=True))
            cases.append(Case("k2", dt, 1, 300, 64, R=16, K=K, per_channel=K % 2 == 0, states=True,
                              varlen=True))
        cases += _flat_cases(dt) + _edge_cases(dt)
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
    from kop_triton.kernels import launch as launch_mod
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


def specializations(cases: List[Case], arch: int, exact: bool = True) -> List[Spec]:
    """The distinct specialisations the cases launch, for sm_<arch>.  ``exact``: as Triton's cache
    tells them apart (integer arguments' divisibility by 16 included); otherwise one per kernel,
    constexpr values, launch options and pointer dtypes (the CI gate: integer divisibility
    changes vector widths, not which tiles live in registers)."""
    _require_compiler()
    specs: Dict[str, Spec] = {}
    binders: Dict = {}
    for c in cases:
        for ln in run_case(c, arch):
            sp = launch_spec(ln, arch, exact, binders)
            if sp.key not in specs:
                specs[sp.key] = sp
            if len(specs[sp.key].cases) < 3:
                specs[sp.key].cases.append(c.label())
    return list(specs.values())


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


def run_cli() -> None:
    """The command line with its Ctrl-C handling (``python -m kop_triton.kernels.report`` / ``kop_triton.gate``)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("python -m kop_triton.kernels.report: interrupted (Ctrl-C); no report written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli()
