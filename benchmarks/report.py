"""Markdown tables and PNG plots from a benchmark JSON document."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from .harness import MB


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_mb(b: Optional[float]) -> str:
    if b is None:
        return "?"
    mb = b / MB
    return f"{mb:.3g}" if mb < 100 else f"{mb:.0f}"


_SHORT = {"skipped": "skip", "over_budget": "budget", "oom": "OOM", "error": "ERR", "wrong": "WRONG"}



def cell(r: dict) -> str:
    if r["status"] == "ok":
        return f"{_fmt_ms(r['time_ms']['median'])} ms / {_fmt_mb(r['peak_mem_bytes'])} MB"
    return _SHORT.get(r["status"], r["status"])


def _skipped_lines(rs, names, shown):
    """One line per reason for the methods that never ran in a table."""
    by_reason: Dict[str, List[str]] = {}
    for n in names:
        if n not in shown:
            why = next(r["reason"] for r in rs if r["method"] == n)
            by_reason.setdefault(why, []).append(f"`{n}`")
    return [f"\nnot run: {', '.join(v)} - {k}" for k, v in sorted(by_reason.items())]


def _shown(rs, methods):
    names = [m for m in dict.fromkeys(r["method"] for r in rs) if methods is None or m in methods]
    shown = [n for n in names if any(r["status"] != "skipped" for r in rs if r["method"] == n)]
    return names, shown


def tables(doc: dict, methods: Optional[List[str]] = None) -> str:
    """Markdown: for a sweep over T, one table per (dtype, D, R, mode) with rows T and columns methods;
    for a sweep at a single T (the shape sweep), one table with a row per (dtype, D, R, mode).
    Cells are 'median time / peak memory during the call'."""
    recs = doc["results"]
    slopes = {(s["sweep"], s["dtype"], s["D"], s["R"], s["mode"], s["method"]): s for s in doc.get("slopes", [])}
    cross = doc.get("crossovers", [])
    out = ["\ncells: median time / peak memory during the call; `budget`: not started, predicted over the "
           "per-call time or memory budget (reason in the JSON); `OOM`, `ERR`, `WRONG` (failed the reference "
           "check, not timed)\n"]
    for sweep in dict.fromkeys(r["sweep"] for r in recs):
        srs = [r for r in recs if r["sweep"] == sweep]
        groups: Dict[tuple, List[dict]] = {}
        for r in srs:
            groups.setdefault((r["dtype"], r["D"], r["R"], r["mode"]), []).append(r)
        if len({r["T"] for r in srs}) == 1:
            names, shown = _shown(srs, methods)
            T, = {r["T"] for r in srs}
            out.append(f"\n### {sweep}: T={T}, B={srs[0]['B']}\n")
            out.append("| dtype | D | R | mode | " + " | ".join(f"`{n}`" for n in shown) + " |")
            out.append("|---|---|---|---|" + "---|" * len(shown))
            for (dt, D, R, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                                                 kv[0][3] != "fwd")):
                row = {r["method"]: r for r in rs}
                out.append(f"| {dt} | {D} | {R} | {mode} | " +
                           " | ".join(cell(row[n]) if n in row else "" for n in shown) + " |")
            out += _skipped_lines(srs, names, shown)
            out.append("")
            continue
        for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] != "fwd")):
            dt, D, R, mode = key
            rs = groups[key]
            names, shown = _shown(rs, methods)
            Ts = sorted({r["T"] for r in rs})
            out.append(f"\n### {sweep}: {dt}, D={D}, R={R}, {'forward' if mode == 'fwd' else 'forward+backward'}\n")
            out.append("| T | B | " + " | ".join(f"`{n}`" for n in shown) + " |")
            out.append("|---|---|" + "---|" * len(shown))
            for T in Ts:
                row = {r["method"]: r for r in rs if r["T"] == T}
                B = next(iter(row.values()))["B"]
                out.append(f"| {T} | {B} | " + " | ".join(cell(row[n]) if n in row else "" for n in shown) + " |")
            def _sl(n):
                x = slopes.get((sweep,) + key + (n,))
                return f"{x['time_slope']:.2f} ({x['time_slope_min']:.2f})" if x else ""
            out.append("| slope (median (min)) | | " + " | ".join(_sl(n) for n in shown) + " |")
            errs = []
            for n in shown:
                e = [r["error"]["output"] for r in rs if r["method"] == n and r.get("error")]
                if e:
                    errs.append(f"`{n}` {max(e):.1e}")
            if errs:
                out.append("\nmax output error vs float64 reference: " + ", ".join(errs))
            out += _skipped_lines(rs, names, shown)
            for c in cross:
                if (c["sweep"], c["dtype"], c["D"], c["R"], c["mode"]) == (sweep,) + key:
                    t = c["crossover_T"]
                    out.append(f"\ncrossover `{c['ours']}` vs `{c['vs']}`: " +
                               (f"T ~ {t} ({c['note']})" if t else c["note"]))
            out.append("")
    return "\n".join(out)


def plots(doc: dict, outdir: str, prefix: str = "") -> List[str]:
    """time vs T, memory vs T (log-log) and fraction of the copy bound, per (sweep, dtype, D, R)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in doc["results"] if r["status"] == "ok"]
    shapes = sorted({(r["sweep"], r["dtype"], r["D"], r["R"]) for r in recs})
    written = []
    for sweep, dt, D, R in shapes:
        rs = [r for r in recs if (r["sweep"], r["dtype"], r["D"], r["R"]) == (sweep, dt, D, R)]
        if len({r["T"] for r in rs}) < 2:
            continue   # a shape sweep at one T: the table says it all
        tag = f"{prefix}{sweep}_{dt}_D{D}_R{R}"
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colors = {n: palette[i % len(palette)] for i, n in enumerate(dict.fromkeys(r["method"] for r in rs))}
        kinds = ("time", "memory", "copy_fraction") if sweep == "T-sweep" else ("time",)
        for what, ylabel, get in (
                ("time", "time per batch (ms)", lambda r: r["time_ms"]["median"]),
                ("memory", "peak memory during the call (MB)", lambda r: r["peak_mem_bytes"] / MB),
                ("copy_fraction", "fraction of the copy bound", lambda r: r["fraction_of_copy_bound"])):
            if what not in kinds:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=(what != "copy_fraction"))
            any_line = False
            for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
                methods = list(dict.fromkeys(r["method"] for r in rs if r["mode"] == mode))
                for name in methods:
                    if what == "copy_fraction" and not name.startswith(("scan/triton", "k2/", "conv/", "scan/chunked")):
                        continue
                    pts = sorted((r["T"], get(r)) for r in rs if r["mode"] == mode and r["method"] == name)
                    pts = [(t, y) for t, y in pts if y is not None and y > 0]
                    if not pts:
                        continue
                    ours = any(r["group"] == "ours" for r in rs if r["method"] == name)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colors[name],
                            ls="-" if ours else "--", lw=2 if ours else 1.2, label=name)
                    any_line = True
                if what == "time":
                    cp = sorted((c["T"], c["time_ms"]["median"]) for c in doc.get("copy_bound", [])
                                if c.get("status") == "ok" and (c.get("sweep"), c["dtype"], c["D"]) == (sweep, dt, D))
                    if cp:
                        ax.plot([c[0] for c in cp], [c[1] for c in cp], color="black", ls=":", lw=1.5,
                                label="copy x->y (bandwidth bound)")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("T (sequence length; fixed tokens per batch)")
                ax.set_title(f"{'forward' if mode == 'fwd' else 'forward+backward'}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
            axes[0].set_ylabel(ylabel)
            fig.suptitle(f"{what.replace('_', ' ')}: {sweep}, {dt}, D={D}, R={R} "
                         f"({doc['machine'].get('gpu_name') or doc['machine']['cpu_model']})", fontsize=10)
            fig.tight_layout()
            if any_line:
                path = os.path.join(outdir, f"{tag}_{what}.png")
                fig.savefig(path, dpi=72)
                written.append(path)
            plt.close(fig)
    return written
