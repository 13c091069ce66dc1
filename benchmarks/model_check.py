"""Measured vs MODELLED time per launch of the fused K2 mixer: ``benchmarks/perf_model.py``'s
prediction beside a CUDA profile of the same launches, and the model's error per kernel.

    python -m benchmarks.model_check --json model_check.json --md model_check.md     # on a GPU
    python -m benchmarks.model_check --profile-table saved.txt --D 1024 --T 1048576  # a saved profile

On a CUDA machine: ``k2_mixer(backend="triton")`` forward + backward at each shape (bf16, B = 1,
R = 16, K = 8), once to compile and warm up, then ``--iters`` times under ``torch.profiler`` with
CUDA activities; ``key_averages().table()`` is saved and parsed (``parse_profiler_table``): each
Triton kernel's total device time / iterations.  The prediction comes from the model's JSON (by
default the committed ``benchmarks/results/model/k2_perf_model_bf16_R16_K8.json``, which names
the commit it priced), launches of one kernel summed per iteration (the profiler merges them by
name: the forward and reverse chunk-state launches, both state-pass directions).  Error =
measured / predicted - 1.  Without CUDA it writes the prediction only (``measured`` null).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "benchmarks", "results", "model", "k2_perf_model_bf16_R16_K8.json")
LABEL = "measured (torch.profiler, CUDA) vs model"

_UNIT = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
_TIME = re.compile(r"^([\d.]+)(ns|us|ms|s)$")


def _us(cell: str) -> Optional[float]:
    m = _TIME.match(cell.strip())
    return float(m.group(1)) * _UNIT[m.group(2)] if m else None


def parse_profiler_table(text: str) -> Dict[str, Dict]:
    """``torch.profiler``'s ``key_averages().table()`` -> {name: {"calls", "device_total_us"}}.
    Columns are found from the dashed rule under the header; the device column is "CUDA total"
    (older torch) or "Device total" / "Self CUDA" / "Self Device" (the total preferred)."""
    lines = text.splitlines()
    rule = next((i for i, ln in enumerate(lines) if re.fullmatch(r"-+( +-+)+ *", ln)), None)
    if rule is None or rule + 1 >= len(lines):
        raise ValueError("not a torch.profiler table: no dashed rule of columns found")
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", lines[rule])]
    header = re.split(r"\s{2,}", lines[rule + 1].strip())     # names hold single spaces at most
    if len(header) != len(spans):
        raise ValueError(f"profiler table header {header} does not match its {len(spans)} columns")
    col = {h: i for i, h in enumerate(header)}
    dev = next((col[h] for h in ("CUDA total", "Device total", "Self CUDA", "Self Device") if h in col), None)
    calls = col.get("# of Calls")
    if dev is None or calls is None:
        raise ValueError(f"profiler table without a device-time or '# of Calls' column: {header}")
    out: Dict[str, Dict] = {}
    for ln in lines[rule + 3:]:
        if re.fullmatch(r"-+( +-+)+ *", ln) or not ln.strip():
            break
        cells = [ln[a:b] if i < len(spans) - 1 else ln[a:] for i, (a, b) in enumerate(spans)]
        name = cells[0].strip()
        t = _us(cells[dev]) if dev < len(cells) else None
        try:
            n = int(cells[calls].strip())
        except (ValueError, IndexError):
            continue
        if t is not None:
            out[name] = {"calls": n, "device_total_us": t}
    return out


def model_rows(doc: Dict, D: int, T: int, dtype: str = "bf16") -> List[Dict]:
    """The model's launch rows at one shape of a perf_model JSON document."""
    for sh in doc["shapes"]:
        s = sh["shape"]
        if (s["D"], s["T"], s["dtype"]) == (D, T, dtype):
            return sh["launches"]
    raise KeyError(f"the model JSON has no shape D={D} T={T} {dtype}; its shapes: "
                   + ", ".join(f"D={s['shape']['D']} T={s['shape']['T']} {s['shape']['dtype']}" for s in doc["shapes"]))


def join(rows: List[Dict], measured: Optional[Dict[str, Dict]], iters: int) -> List[Dict]:
    """Per kernel: predicted us per fwd+bwd (its launches summed), measured us per fwd+bwd (device
    total / iters), launches per iteration, the error; kernels the profile holds that the model does
    not price are listed with predicted None."""
    pred: Dict[str, Dict] = {}
    for r in rows:
        if r.get("programs"):
            p = pred.setdefault(r["kernel"], {"kernel": r["kernel"], "predicted_us": 0.0, "launches": 0, "bounds": []})
            p["predicted_us"] += r["time_s"] * 1e6
            p["launches"] += 1
            p["bounds"].append(r["bound"])
    out = []
    for k, p in pred.items():
        m = (measured or {}).get(k)
        meas = m["device_total_us"] / iters if m else None
        out.append({**p, "measured_us": meas, "measured_launches": m["calls"] / iters if m else None,
                    "error": (meas / p["predicted_us"] - 1) if meas and p["predicted_us"] else None})
    for k, m in (measured or {}).items():
        if k not in pred and not k.startswith(("ProfilerStep", "aten::", "cuda", "Memcpy", "Memset")) \
                and "autograd" not in k.lower():
            out.append({"kernel": k, "predicted_us": None, "launches": None, "bounds": [],
                        "measured_us": m["device_total_us"] / iters, "measured_launches": m["calls"] / iters,
                        "error": None, "note": "not priced by the model"})
    return out


def measure(D: int, T: int, iters: int = 5, dtype: str = "bf16", R: int = 16, K: int = 8) -> str:
    """The profiler table of ``iters`` fused forward + backward passes at one shape (CUDA only)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kop_triton import k2_mixer
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    x = torch.randn(1, T, D, device=dev, dtype=dt, generator=g).requires_grad_()
    u = (torch.randn(D, R, device=dev, generator=g) / D ** 0.5).requires_grad_()
    v = (torch.randn(D, R, device=dev, generator=g) / D ** 0.5).requires_grad_()
    alpha = torch.ones(R, device=dev, requires_grad=True)
    gamma = (torch.rand(R, device=dev, generator=g) * 0.5 + 0.5).requires_grad_()
    w = torch.randn(K, device=dev, generator=g).requires_grad_()
    gl = torch.zeros(1, device=dev, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        y = k2_mixer(x, u, v, alpha, gamma, w, gl, backend="triton")
        y = y[0] if isinstance(y, tuple) else y
        torch.autograd.grad(y, [x, u, v, alpha, gamma, w, gl], dy)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total" if hasattr(prof.key_averages()[0], "cuda_time_total")
                                     else "device_time_total", row_limit=60, max_name_column_width=60)


def _pct(e: Optional[float]) -> str:
    return "-" if e is None else f"{e:+.0%}"


def markdown(doc: Dict) -> str:
    L = [f"# K2 fused mixer: {doc['label']}", "",
         f"Model: `{os.path.relpath(doc['model'], ROOT) if os.path.isabs(doc['model']) else doc['model']}` "
         f"(priced commit `{doc.get('priced_commit')}`); device: {doc.get('device') or 'none (prediction only)'}; "
         f"{doc['iters']} iterations profiled per shape.", "",
         "| D | T | kernel | launches | predicted us | measured us | error | model bound |",
         "|---|---|---|---|---|---|---|---|"]
    for sh in doc["shapes"]:
        for r in sh["rows"]:
            f = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
            L.append(f"| {sh['D']} | {sh['T']} | {r['kernel']} | {r['launches'] or '-'} | {f(r['predicted_us'])} | "
                     f"{f(r['measured_us'])} | {_pct(r['error'])} | "
                     f"{', '.join(sorted(set(r['bounds']))) or '-'} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.model_check", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the perf_model JSON (default: the committed one)")
    ap.add_argument("--D", default="64,1024")
    ap.add_argument("--T", default="65536,1048576")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--profile-table", help="a saved key_averages().table() to join instead of measuring "
                                            "(one shape: give one --D and one --T)")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    try:
        with open(a.model) as f:
            model = json.load(f)
    except (OSError, ValueError) as e:
        ap.error(f"--model {a.model}: cannot read it as JSON ({e})")
    Ds, Ts = [int(d) for d in a.D.split(",")], [int(t) for t in a.T.split(",")]
    cuda = False
    if a.profile_table is None:
        try:
            import torch
            cuda = torch.cuda.is_available()
        except ImportError:
            pass
    elif len(Ds) * len(Ts) != 1:
        ap.error("--profile-table: give one --D and one --T (the shape that profile ran)")
    doc = {"label": LABEL, "model": a.model, "priced_commit": model.get("priced_commit"), "iters": a.iters,
           "device": None, "shapes": []}
    if cuda:
        import torch
        doc["device"] = torch.cuda.get_device_name()
    for D in Ds:
        for T in Ts:
            try:
                rows = model_rows(model, D, T, a.dtype)
            except KeyError as e:
                ap.error(f"--model: {e.args[0]}")
            table, measured = None, None
            if a.profile_table:
                with open(a.profile_table) as f:
                    table = f.read()
            elif cuda:
                table = measure(D, T, a.iters, a.dtype)
            if table is not None:
                measured = parse_profiler_table(table)
            doc["shapes"].append({"D": D, "T": T, "dtype": a.dtype, "profile_table": table,
                                  "status": "measured" if measured is not None else "no CUDA device: prediction only",
                                  "rows": join(rows, measured, a.iters)})
            print(f"model_check D={D} T={T}: {doc['shapes'][-1]['status']}", flush=True)
    md = markdown(doc)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
