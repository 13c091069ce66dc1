"""The benchmark harness (issue 6): ours and the alternatives, side by side, in one process and one run.

    python -m benchmarks.run                 # default sweep for the machine (GPU: full; CPU: reduced)
    python -m benchmarks.run --quick         # CPU / CI-sized
    python -m benchmarks.run --out benchmarks/results/cpu-2026-11-28 --note "machine shared"

Methods (benchmarks/methods.py): our Triton kernels (fused K2 mixer, decayed scan, causal conv; CUDA
only, recorded as skipped on CPU) and the chunked PyTorch path; the quadratic formulations (the
project's naive scan and the reference implementation's (T, T, R) "mask" form), the recurrent scan,
causal softmax attention through F.scaled_dot_product_attention at the same width, F.conv1d, and
flash-linear-attention's chunk_gla when importable; and the bandwidth bound, a device copy of x.

Each method's output (and, forward+backward, every input gradient) is checked against a float64
reference before it is timed.  Writes <out>/results.json, <out>/results.md and PNG plots.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from . import cli
from . import harness as H
from .methods import METHODS, select
from .report import plots, tables
from .sweep import Log, SweepSpec, document, run_sweep

OURS_AND_PEERS = ["scan/triton", "scan/chunked", "k2/triton_fused", "k2/triton_unfused", "k2/chunked",
                  "conv/triton", "conv/conv1d", "attention/sdpa", "scan/fla_chunk_gla"]

# The reference v2 Tiny Shakespeare configuration (character vocabulary of 65).
LM_CONFIG = dict(vocab_size=65, d_model=64, n_k2=6, rank=4, kernel_size=8, shared_kernel=True, window=2048)


def default_plan(kind: str, quick: bool) -> dict:
    """Sizes per machine.  The full sweep is for the GPU; the CPU runs finish in minutes on 2 cores."""
    if quick:
        return dict(T=[128, 256, 512, 1024], tokens=1024, D=[64], R=[16], dtypes=["fp32"], long_T=[],
                    shape_T=[256], shape_tokens=512, shape_D=[32, 128], shape_R=[4, 16], shape_dtypes=["fp32"],
                    lm_batch=2, lm_T=256, lm_steps=2)
    if kind == "cuda":
        return dict(T=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536], tokens=65536, D=[256], R=[16],
                    dtypes=["fp32", "bf16"], long_T=[1024 * 1024],
                    shape_T=[8192], shape_tokens=65536, shape_D=[64, 256, 1024], shape_R=[4, 16, 64],
                    shape_dtypes=["fp32", "bf16"], lm_batch=32, lm_T=2048, lm_steps=10)
    return dict(T=[128, 256, 512, 1024, 2048, 4096, 8192, 16384], tokens=16384, D=[256], R=[16], dtypes=["fp32"],
                long_T=[], shape_T=[2048], shape_tokens=2048, shape_D=[64, 256, 1024], shape_R=[4, 16, 64],
                shape_dtypes=["fp32"], lm_batch=2, lm_T=2048, lm_steps=3,
                extra_dtypes=["bf16"], extra_T=[512, 2048, 8192])


from .sweep import DTYPES as _SWEEP_DTYPES

DTYPES = tuple(_SWEEP_DTYPES)


def results_dir(out, device_type: str) -> str:
    """The run's results folder, created here: ``out`` must be new or empty (a run never overwrites
    or mixes into another's files); the default is a new scratch folder per run, named by date and
    time (a second run the same day gets its own).  A ValueError says why ``out`` cannot be used."""
    if out is None:
        base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "_scratch",
                            f"{device_type}-{time.strftime('%Y-%m-%d-%H%M%S')}")
        out, n = base, 1
        while os.path.exists(out):
            n += 1
            out = f"{base}-{n}"
    elif os.path.isfile(out):
        raise ValueError(f"--out {out} is a file; --out names the results folder (a new or empty one)")
    elif os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"--out {out} already holds files ({', '.join(sorted(os.listdir(out))[:4])}); a run "
                         f"writes into a new or empty folder, so it never overwrites another run: choose another")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the results folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: the folder is not writable")
    return out


def lm_throughput(device: torch.device, batch: int, T: int, steps: int, backend: str, log,
                  autocast_bf16: bool = False) -> dict:
    """Training throughput (tokens/s) of KStackLM in the reference v2 configuration: forward,
    backward and an AdamW step per batch of ``batch`` sequences of ``T`` synthetic token ids."""
    rec = {"config": dict(LM_CONFIG, backend=backend), "batch": batch, "T": T, "steps": steps,
           "autocast_bf16": autocast_bf16, "data": "random token ids (throughput does not depend on content)"}
    if backend == "triton" and device.type != "cuda":
        rec.update(status="skipped", reason="skipped: no CUDA device (Triton kernels are never timed through the interpreter)")
        return rec
    try:
        from kop_triton.model import KStackConfig, KStackLM
    except ImportError as exc:
        rec.update(status="skipped", reason=f"skipped: kop_triton.model not available ({exc})")
        return rec
    try:
        torch.manual_seed(0)
        model = KStackLM(KStackConfig(**LM_CONFIG, backend=backend)).to(device)
        rec["parameters"] = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, LM_CONFIG["vocab_size"], (batch, T + 1), generator=g).to(device)
        x, y = ids[:, :-1], ids[:, 1:]

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                loss = model(x, y)
            loss.backward()
            opt.step()
            return loss

        t0 = time.perf_counter()
        first_loss = step().item()
        H.sync(device)
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            H.sync(device)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rec.update(status="ok", first_step_s=first_s, step_s=times, median_step_s=med,
                   tokens_per_s=batch * T / med, first_loss=first_loss, last_loss=loss.item())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    except NotImplementedError as exc:
        rec.update(status="skipped", reason=f"skipped: not implemented ({exc})")
    except Exception as exc:  # noqa: BLE001 - recorded, never raised
        rec.update(status="oom" if H.is_oom(exc) else "error", reason=f"{type(exc).__name__}: {exc}"[:300])
    log(f"LM throughput backend={backend} batch={batch} T={T}: "
        + (f"{rec['tokens_per_s']:.0f} tokens/s" if rec["status"] == "ok" else rec.get("reason", rec["status"])))
    return rec


def main(argv=None) -> dict:
    from kop_triton.cli import ArgumentParser   # one-line usage errors, exit status 2
    p = ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU / CI-sized sweep (about a minute)")
    p.add_argument("--out", default=None,
                   help="results directory, new or empty (default: a new benchmarks/results/_scratch/<cpu|cuda>-<date>-<time>, "
                        "not committed)")
    p.add_argument("--methods", type=cli.str_list, default=None,
                   help=f"methods of the T sweep (default all): {', '.join(m.name for m in METHODS)}")
    p.add_argument("--T", type=cli.int_list, default=None, help="T sweep (e.g. 512,1k,64k)")
    p.add_argument("--long-T", type=cli.int_list, default=None, help="extra T for our kernels only (GPU: 1m)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch of the T sweep")
    p.add_argument("--D", type=cli.int_list, default=None)
    p.add_argument("--R", type=cli.int_list, default=None)
    p.add_argument("--dtypes", type=cli.str_list, default=None, help="fp32,bf16")
    p.add_argument("--modes", type=cli.str_list, default=["fwd", "fwd_bwd"])
    p.add_argument("--shape-T", type=cli.int_list, default=None, help="T of the (D, R, dtype) shape sweep")
    p.add_argument("--shape-tokens", type=int, default=None)
    p.add_argument("--shape-D", type=cli.int_list, default=None)
    p.add_argument("--shape-R", type=cli.int_list, default=None)
    p.add_argument("--shape-dtypes", type=cli.str_list, default=None)
    p.add_argument("--no-shape", action="store_true", help="skip the shape sweep")
    p.add_argument("--lm-batch", type=int, default=None)
    p.add_argument("--lm-T", type=int, default=None)
    p.add_argument("--lm-steps", type=int, default=None)
    p.add_argument("--no-lm", action="store_true", help="skip the LM training-throughput figure")
    p.add_argument("--no-plots", action="store_true")
    # --quiet (cli.add_common) silences the progress log; the short summary at the end is always printed
    cli.add_common(p)
    args = p.parse_args(argv)
    try:
        for k in ("tokens", "shape_tokens", "lm_batch", "lm_T", "lm_steps"):
            if getattr(args, k) is not None and getattr(args, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
        for k, known in (("modes", ("fwd", "fwd_bwd")), ("dtypes", DTYPES), ("shape_dtypes", DTYPES)):
            bad = [v for v in (getattr(args, k) or []) if v not in known]
            if bad or getattr(args, k) == []:
                raise ValueError(f"--{k.replace('_', '-')} takes a comma-separated list of {', '.join(known)}, "
                                 f"got {getattr(args, k)!r}")
        if args.methods is not None:
            select(args.methods)
        device, threads, budget = cli.setup(args)
        out = results_dir(args.out, device.type)
    except ValueError as e:
        p.error(str(e))
    if args.quick and args.time_budget is None:
        budget.time_s = 0.5
    plan = default_plan(device.type, args.quick)
    for k in ("T", "tokens", "D", "R", "dtypes", "shape_T", "shape_tokens", "shape_D", "shape_R", "shape_dtypes",
              "lm_batch", "lm_T", "lm_steps"):
        if getattr(args, k) is not None:
            plan[k] = getattr(args, k)
    if args.long_T is not None:
        plan["long_T"] = args.long_T
    log = Log(args.quiet)
    t_start = time.perf_counter()
    log(f"device {device}, torch threads {threads}, budget {budget.time_s:g} s / "
        f"{budget.mem_bytes / 2**30:.1f} GiB per call, results -> {out}")

    default = [m for m in METHODS if m.name not in ("k2/naive", "k2/recurrent")]   # those: bench_k2
    specs = [SweepSpec("T-sweep", select(args.methods) if args.methods else default, plan["T"],
                       plan["tokens"], plan["D"], plan["R"], plan["dtypes"], args.modes, long_Ts=plan["long_T"])]
    if not args.no_shape:
        specs.append(SweepSpec("shape-sweep", select(OURS_AND_PEERS), plan["shape_T"], plan["shape_tokens"],
                               plan["shape_D"], plan["shape_R"], plan["shape_dtypes"], args.modes))
        if plan.get("extra_dtypes"):
            # CPU: the other dtype on a short T sweep of our path and its peers (the GPU sweeps both fully)
            specs.append(SweepSpec("dtype-sweep", select(OURS_AND_PEERS), plan["extra_T"], plan["tokens"],
                                   plan["D"], plan["R"], plan["extra_dtypes"], args.modes))
    records, copies = [], []
    json_path = os.path.join(out, "results.json")
    for spec in specs:
        r, c = run_sweep(spec, device, budget, log, grad_check=not args.no_grad_check)
        records += r
        copies += c
        # saved after every sweep, so a run cut short (device time limit) still leaves its results
        cli.write_json(document(specs, records, copies, device, threads,
                                {"note": args.note, "flush_denormal": args.flush_denormal, "complete": False}),
                       json_path)

    lm = []
    if not args.no_lm:
        backends = ["triton", "chunked"]
        for bk in backends:
            lm.append(lm_throughput(device, plan["lm_batch"], plan["lm_T"], plan["lm_steps"], bk, log))
        if device.type == "cuda":
            lm.append(lm_throughput(device, plan["lm_batch"], plan["lm_T"], plan["lm_steps"], "triton", log,
                                    autocast_bf16=True))
    lm_note = ("reference v2 Tiny Shakespeare configuration (d_model 64, n_k2 6, rank 4, window 2048, shared "
               f"kernel 8); batch {plan['lm_batch']}" +
               (" (reference batch 32 reduced on CPU)" if device.type != "cuda" and plan["lm_batch"] != 32 else ""))
    doc = document(specs, records, copies, device, threads,
                   {"note": args.note, "flush_denormal": args.flush_denormal, "quick": args.quick, "complete": True,
                    "budget": {"time_s": budget.time_s, "mem_bytes": budget.mem_bytes},
                    "lm_throughput": {"note": lm_note, "runs": lm},
                    "runtime_s": None})
    doc["runtime_s"] = round(time.perf_counter() - t_start, 1)
    cli.write_json(doc, json_path)
    pngs = [] if args.no_plots else plots(doc, out)
    md = render_markdown(doc, pngs, out)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    log(f"wrote {json_path}, results.md and {len(pngs)} plots in {doc['runtime_s']:.0f} s")
    print("\n".join(summary(doc, out)), file=sys.stderr, flush=True)   # also with --quiet (no progress log)
    return doc


def summary(doc: dict, out: str) -> list:
    """The few lines printed at the end of a run: what was measured, the headline figures, and where
    the results are (and how to keep them: the default folder is git-ignored scratch)."""
    counts = {}
    for r in doc["results"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = ["", "== benchmark summary " + "=" * 50,
             f"{len(doc['results'])} measurements: " + ", ".join(f"{n} {st}" for st, n in sorted(counts.items()))
             + f"; {doc['runtime_s']:.0f} s"]
    for r in doc["lm_throughput"]["runs"]:
        what = f"LM training step, backend {r['config']['backend']}" + (" + bf16 autocast" if r["autocast_bf16"] else "")
        lines.append(f"{what}: " + (f"{r['tokens_per_s']:,.0f} tokens/s (batch {r['batch']} x T {r['T']})"
                                    if r["status"] == "ok" else r.get("reason", r["status"])))
    ours = [sl for sl in doc["slopes"] if sl["sweep"] == "T-sweep" and sl["mode"] == "fwd_bwd"]
    if ours and doc.get("quick"):
        lines.append("log-log slopes vs T not shown: at --quick sizes (T <= 1024) fixed per-call costs dominate, "
                     "so they say nothing about scaling; run without --quick for them")
    elif ours:
        lines.append("time per sequence vs T, log-log slope (fwd+bwd; 1 = linear, 2 = quadratic): "
                     + ", ".join(f"{sl['method']} {sl['time_slope']:.2f}" for sl in ours))
    for c in doc["crossovers"]:
        if c["sweep"] == "T-sweep" and c["mode"] == "fwd_bwd" and c["crossover_T"]:
            lines.append(f"{c['ours']} beats {c['vs']} from T ~ {c['crossover_T']} ({c['dtype']}, fwd+bwd)")
    lines.append(f"results: {os.path.join(out, 'results.json')} (all figures), {os.path.join(out, 'results.md')} "
                 "(tables; read it first), plots beside them")
    if os.sep + "_scratch" + os.sep in os.path.abspath(out) + os.sep:
        lines.append("that folder is git-ignored scratch: to keep a run, copy it to benchmarks/results/<name>/ and "
                     "commit it, or run with --out benchmarks/results/<name> (make bench BENCH_FLAGS=\"--out ...\")")
    return lines


def _load(xs):
    return "n/a" if not xs else "/".join(f"{x:.1f}" for x in xs)


def render_markdown(doc: dict, pngs, out: str) -> str:
    m = doc["machine"]
    lines = [f"# Benchmark results: {m.get('gpu_name') or m['cpu_model']} ({m['kind']})", "",
             f"- created {doc['created']}, runtime {doc['runtime_s']} s",
             f"- command: `{doc['command']}`",
             f"- torch {m['torch']}, triton {m['triton']}, python {m['python']}, git {m['git_commit']}",
             f"- torch threads {doc['settings']['torch_threads']} of {m['cpu_count']} cores; load average at start "
             f"{_load(m['load_average_at_start'])}, at end {_load(m['load_average_at_end'])} (1/5/15 min)",
             f"- timing: {doc['settings']['timing_method']}",
             f"- memory: {doc['settings']['memory_method']}",
             f"- budget per call: {doc['budget']['time_s']:g} s, {doc['budget']['mem_bytes'] / 2**30:.1f} GiB "
             "(predicted from the previous T; runs over it are recorded, not started)"]
    if doc.get("note"):
        lines.append(f"- note: {doc['note']}")
    if doc.get("quick"):
        lines.append("- **--quick run**: T <= 1024, where fixed per-call costs dominate; the log-log slopes in the "
                     "tables do not measure scaling at these sizes (run without --quick for that)")
    lines += ["", "## LM training throughput", "", doc["lm_throughput"]["note"], ""]
    for r in doc["lm_throughput"]["runs"]:
        desc = f"backend `{r['config']['backend']}`" + (", bf16 autocast" if r["autocast_bf16"] else "")
        if r["status"] == "ok":
            lines.append(f"- {desc}: **{r['tokens_per_s']:.0f} tokens/s** (batch {r['batch']} x T {r['T']}, "
                         f"median of {r['steps']} steps of {r['median_step_s']:.2f} s; first loss {r['first_loss']:.3f})")
        else:
            lines.append(f"- {desc}: {r.get('reason', r['status'])}")
    lines += ["", "## Slopes (log-log, time per sequence vs T; linear ~1, quadratic ~2)", "",
              "from the median time and (in brackets) from the fastest repetition; memory: peak per sequence", "",
              "| sweep | dtype | D | R | mode | method | time slope | memory slope | T range |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in doc["slopes"]:
        mem = "" if s["memory_per_seq_slope"] is None else f"{s['memory_per_seq_slope']:.2f}"
        lines.append(f"| {s['sweep']} | {s['dtype']} | {s['D']} | {s['R']} | {s['mode']} | `{s['method']}` | "
                     f"{s['time_slope']:.2f} ({s['time_slope_min']:.2f}) | {mem} | "
                     f"{s['T_range'][0]}..{s['T_range'][1]} |")
    lines += ["", "## Crossover with causal softmax attention", ""]
    for c in doc["crossovers"]:
        if c["note"].startswith("one T only"):
            continue   # the shape sweep: see its table
        t = c["crossover_T"]
        lines.append(f"- {c['sweep']} {c['dtype']} D={c['D']} R={c['R']} {c['mode']}: `{c['ours']}` beats "
                     f"`{c['vs']}` " + (f"from T ~ {t} ({c['note']})" if t else f"- {c['note']}"))
    lines += ["", "## Copy bound (device copy of x, read + write)", ""]
    bws = [c for c in doc["copy_bound"] if c["status"] == "ok"]
    if bws:
        lines.append("achievable bandwidth %.1f .. %.1f GB/s over the sizes of the sweep"
                     % (min(c["bandwidth_GBps"] for c in bws), max(c["bandwidth_GBps"] for c in bws)))
    lines += ["", "## Tables", tables(doc), "## Plots", ""]
    for pth in pngs:
        name = os.path.basename(pth)
        lines.append(f"![{name}]({name})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("python -m benchmarks.run: interrupted (Ctrl-C); results.json holds the sweeps finished so far",
              file=sys.stderr)
        sys.exit(130)
