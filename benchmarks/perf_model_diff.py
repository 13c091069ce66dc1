"""Two runs of the performance model side by side, launch by launch (a MODEL, not a measurement).

    git show OLD:benchmarks/results/model/k2_perf_model_bf16_R16_K8.json > before.json
    python -m benchmarks.perf_model_diff before.json benchmarks/results/model/k2_perf_model_bf16_R16_K8.json bf16

prints, for every shape of the given dtype, the op's fwd+bwd time and fraction of the copy bound
before -> after, and per launch: bytes per token, dependent steps, resident warps per SM, predicted
time and bound (markdown).  A launch only one run has shows "-" on the other side.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Tuple

# perf_model's limits, shortened for the table's bound column (an unknown limit is shown whole)
SHORT_LIMIT = {"dependent steps": "steps",
               "bytes in flight (occupancy x bytes a CTA loads per iteration)": "in flight",
               "copy bandwidth": "bw", "SMs covered (each at most 1/SMs of the copy bandwidth)": "SMs",
               "one DRAM round trip": "1 trip"}


def _shapes(path: str) -> Dict[Tuple[str, int, int], Dict]:
    with open(path) as f:
        run = json.load(f)
    return {(s["shape"]["dtype"], s["shape"]["D"], s["shape"]["T"]): s for s in run["shapes"]}


def _cells(launch: Optional[Dict]) -> List[str]:
    if launch is None:
        return ["-"] * 4
    short = SHORT_LIMIT.get(launch.get("limit", ""), launch.get("limit", ""))
    return [f"{launch['bytes_per_token']:,.0f}", str(launch.get("dependent_steps", "-")),
            str(launch.get("warps_per_sm", "-")),
            f"{launch['time_s'] * 1e6:,.1f} {launch.get('bound', '-')[:3]}:{short}"]


def table(before: Dict, after: Dict, dtype: str) -> str:
    out = []
    for k in sorted(after):
        if k[0] != dtype:
            continue
        if k not in before:
            raise SystemExit(f"perf_model_diff: the before run has no shape dtype={k[0]} D={k[1]} T={k[2]}; "
                             "price both runs on the same shapes (python -m benchmarks.perf_model --help)")
        sa, sb = after[k], before[k]
        fa, fb = sa["ops"]["fwd_bwd"], sb["ops"]["fwd_bwd"]
        out.append(f"\n**{k[0]}, D = {k[1]}, T = {k[2]:,}**: fwd+bwd {fb['time_s'] * 1e6:,.1f} us "
                   f"({fb['fraction_of_copy_bound']:.0%} of the copy bound, walk {fb['walk_share']:.0%}) "
                   f"-> {fa['time_s'] * 1e6:,.1f} us ({fa['fraction_of_copy_bound']:.0%}, walk {fa['walk_share']:.0%})\n")
        out.append("| launch | before B/tok | steps | warps/SM | before us, bound | after B/tok | steps | warps/SM "
                   "| after us, bound |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        runs: Dict[Tuple[str, str], Tuple[List[Dict], List[Dict]]] = {}    # in the after run's launch order
        for side, launches in ((1, sa["launches"]), (0, sb["launches"])):
            for ln in launches:
                runs.setdefault((ln["phase"], ln["kernel"]), ([], []))[side].append(ln)
        for (phase, kernel), (xb, xa) in runs.items():
            for i in range(max(len(xb), len(xa))):
                cells = _cells(xb[i] if i < len(xb) else None) + _cells(xa[i] if i < len(xa) else None)
                out.append(f"| {phase} {kernel} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="a perf_model JSON (--json)")
    p.add_argument("after", help="a perf_model JSON priced on the same shapes")
    p.add_argument("dtype", choices=["bf16", "fp16", "fp32"])
    a = p.parse_args(argv)
    print(table(_shapes(a.before), _shapes(a.after), a.dtype))


if __name__ == "__main__":
    main()
