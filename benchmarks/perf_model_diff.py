"""Two runs of the performance model side by side, launch by launch (a MODEL, not a measurement).

    git show OLD:benchmarks/results/model/k2_perf_model_bf16_R16_K8.json > before.json
    python -m benchmarks.perf_model_diff before.json benchmarks/results/model/k2_perf_model_bf16_R16_K8.json bf16

prints, for every shape of the given dtype, the op's fwd+bwd time and fraction of the copy bound
before -> after, and per launch: bytes per token, dependent steps, resident warps per SM, predicted
time and bound (markdown)."""
import json
import sys


def main(argv):
    b = json.load(open(argv[1])); a = json.load(open(argv[2]))
    def key(sh): s = sh['shape']; return (s['dtype'], s['D'], s['T'])
    B = {key(s): s for s in b['shapes']}; A = {key(s): s for s in a['shapes']}
    def lname(l): return l['kernel'] + (" (rev)" if l.get('traffic_name') and 'reverse' in (l.get('traffic_name') or '') else "")
    def fmt(l):
        if l is None: return "-", "-", "-", "-"
        bound = l.get('bound', '-')
        lim = l.get('limit', '')
        short = {'dependent steps': 'steps', 'bytes in flight (occupancy x bytes a CTA loads per iteration)': 'in flight',
                 'copy bandwidth': 'bw', 'SMs covered (each at most 1/SMs of the copy bandwidth)': 'SMs',
                 'one DRAM round trip': '1 trip'}.get(lim, lim)
        return (f"{l['bytes_per_token']:,.0f}", str(l.get('dependent_steps', '-')),
                str(l.get('warps_per_sm', '-')), f"{l['time_s']*1e6:,.1f} {bound[:3]}:{short}")
    out = []
    for k in sorted(A):
        if k[0] != argv[3]: continue
        sa, sb = A[k], B.get(k)
        fa, fb = sa['ops']['fwd_bwd'], sb['ops']['fwd_bwd']
        out.append(f"\n**{k[0]}, D = {k[1]}, T = {k[2]:,}**: fwd+bwd {fb['time_s']*1e6:,.1f} us ({fb['fraction_of_copy_bound']:.0%} of the copy bound, walk {fb['walk_share']:.0%}) "
                   f"-> {fa['time_s']*1e6:,.1f} us ({fa['fraction_of_copy_bound']:.0%}, walk {fa['walk_share']:.0%})\n")
        out.append("| launch | before B/tok | steps | warps/SM | before us, bound | after B/tok | steps | warps/SM | after us, bound |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        lb = [l for l in sb['launches']]; la = [l for l in sa['launches']]
        names = []
        for l in la + lb:
            n = (l['phase'], l['kernel'])
            if n not in names: names.append(n)
        for ph, kn in names:
            xb = [l for l in lb if (l['phase'], l['kernel']) == (ph, kn)]
            xa = [l for l in la if (l['phase'], l['kernel']) == (ph, kn)]
            for i in range(max(len(xb), len(xa))):
                pb = fmt(xb[i] if i < len(xb) else None); pa = fmt(xa[i] if i < len(xa) else None)
                out.append(f"| {ph} {kn} | " + " | ".join(pb) + " | " + " | ".join(pa) + " |")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv)
