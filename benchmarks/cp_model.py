"""A MODEL (not a measurement) of context parallelism's state exchange against the per-rank compute.

One training step (forward + backward) of one K2 block (mixer, output projection, MLP) on a sequence of
T tokens split over W ranks (L = T / W tokens each, batch of one sequence per CP group), H100 SXM GPUs.

Exchange (``kop_triton.context_parallel``): per K2 layer, a forward all-gather of every rank's payload
n = (R + K - 1) * D * 4 bytes (float32 scan state and conv tail) and a backward all-to-all of the
payloads' gradients.  Modelled as rings in the alpha-beta model: each of the two collectives takes
(W - 1) * (alpha + n / beta) and moves (W - 1) * n bytes per rank and direction.  Compared:

  allgather   what the code does (above);
  pipeline    ``exchange="pipeline"``: a send/recv chain rank 0 -> 1 -> ... -> W-1 (composed state
              forward, its gradient back):
              the same (W - 1) * (alpha + n / beta) critical path (each hop waits for the previous
              one), but n bytes per rank and direction instead of (W - 1) * n;
  logscan     a log-depth (Kogge-Stone) prefix scan over send/recv, not implemented: ceil(log2 W)
              rounds of (alpha + (n + 4R) / beta) (the decay product travels with the state).

Compute per rank: the block's matmul FLOPs, 3x the forward's (forward + backward), at ``MFU`` of the
H100's dense bf16 peak.  Forward FLOPs per token: output projection 2 D^2, MLP 8 D^2 (D -> 2D -> D),
q/k projection 4 D R, chunked scan 2 C D + 4 R D (C = 64, the Triton kernel's chunk), and the CP
summary (k projection and the decayed k^T x product, 2 D R + 2 R D).  The mixer's memory traffic is
left out, so the compute time is on the short side and the exchange fractions on the high side.

    python -m benchmarks.cp_model --json benchmarks/results/model/cp_scaling.json \\
        --md benchmarks/results/model/cp_scaling.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys

# every constant with its source
CONSTANTS = {
    "bf16_dense_peak_flops": (989.4e12, "NVIDIA H100 SXM5 datasheet: 989.4 TFLOPS bf16 dense (1,979 with sparsity)"),
    "mfu": (0.5, "ASSUMED model FLOPs utilisation of the block's matmuls (optimistic: a fast GPU makes the "
                 "exchange look larger)"),
    "nvlink_bytes_per_s": (450e9, "NVIDIA H100 SXM5 datasheet: NVLink 4 900 GB/s per GPU bidirectional, so "
                                  "450 GB/s per direction"),
    "nvlink_alpha_s": (5e-6, "ASSUMED per-hop latency of an NCCL ring step inside a node (LL protocol: a "
                             "few microseconds); not measured here"),
    "ib_bytes_per_s": (50e9, "400 Gb/s InfiniBand NDR (one ConnectX-7 per GPU, NVIDIA DGX H100 datasheet) "
                             "= 50 GB/s per direction"),
    "ib_alpha_s": (10e-6, "ASSUMED per-hop latency across nodes (IB ~1-2 us wire + NCCL proxy and "
                          "launch overheads); not measured here"),
    "gpus_per_node": (8, "DGX / HGX H100: 8 GPUs on NVLink per node; W > 8 rings cross InfiniBand"),
    "chunk": (64, "the fused Triton K2 kernel's chunk (kop_triton.kernels.config.CHUNK)"),
}


def c(name):
    return CONSTANTS[name][0]


def point(T: int, D: int, W: int, R: int = 16, K: int = 8) -> dict:
    L = T / W
    n = (R + K - 1) * D * 4                                   # payload bytes per rank
    fwd_flops_tok = 2 * D * D + 8 * D * D + 4 * D * R + 2 * c("chunk") * D + 4 * R * D + 4 * R * D
    compute_s = 3 * fwd_flops_tok * L / (c("mfu") * c("bf16_dense_peak_flops"))
    intra = W <= c("gpus_per_node")
    beta = c("nvlink_bytes_per_s") if intra else c("ib_bytes_per_s")
    alpha = c("nvlink_alpha_s") if intra else c("ib_alpha_s")
    ring = 2 * (W - 1) * (alpha + n / beta)                   # forward all-gather + backward all-to-all
    log = 2 * math.ceil(math.log2(W)) * (alpha + (n + 4 * R) / beta)
    return dict(T=T, D=D, W=W, R=R, K=K, tokens_per_rank=L, link="NVLink" if intra else "IB NDR",
                payload_bytes=n,
                allgather_bytes_sent_per_rank=2 * (W - 1) * n, pipeline_bytes_sent_per_rank=2 * n,
                compute_ms=compute_s * 1e3, allgather_ms=ring * 1e3, pipeline_ms=ring * 1e3, logscan_ms=log * 1e3,
                allgather_frac=ring / compute_s, logscan_frac=log / compute_s)


def grid(Ts, Ds, Ws):
    return [point(T, D, W) for D in Ds for W in Ws for T in Ts]


def _fmt_T(T):
    return f"{T >> 20}M"


def markdown(points, Ts, Ds, Ws) -> str:
    by = {(p["T"], p["D"], p["W"]): p for p in points}
    lines = ["# Context parallelism: state exchange vs compute (a MODEL, not a measurement)", "",
             "Per K2 block and training step (forward + backward), one sequence of T tokens over W H100 GPUs, "
             "R = 16, K = 8; `python -m benchmarks.cp_model` (its docstring has the formulas).  Cells: "
             "exchange time / per-rank compute time, in % (all-gather ring as implemented; a pipelined "
             "send/recv chain has the same critical path).  W <= 8: NVLink 450 GB/s per direction, W > 8: "
             "400 Gb/s InfiniBand (50 GB/s).", "",
             "Constants and sources:", ""]
    for k, (v, src) in CONSTANTS.items():
        lines.append(f"- `{k}` = {v:g}: {src}")
    lines += ["", "| D | W | link | payload / rank | bytes sent / rank (fwd + bwd) | "
              + " | ".join(f"T={_fmt_T(T)}" for T in Ts) + " |",
              "|---|---|---|---|---|" + "---|" * len(Ts)]
    for D in Ds:
        for W in Ws:
            p0 = by[(Ts[0], D, W)]
            cells = []
            for T in Ts:
                p = by[(T, D, W)]
                cells.append(f"{p['allgather_ms']:.3g} / {p['compute_ms']:.3g} ms ({100 * p['allgather_frac']:.2g}%)")
            lines.append(f"| {D} | {W} | {p0['link']} | {p0['payload_bytes'] / 1024:.0f} KiB | "
                         f"{p0['allgather_bytes_sent_per_rank'] / 2 ** 20:.1f} MiB | " + " | ".join(cells) + " |")
    lines += ["", "Where the exchange is under 1% of the compute (smallest T of the grid; '-' none):", "",
              "| D | " + " | ".join(f"W={W}" for W in Ws) + " |", "|---|" + "---|" * len(Ws)]
    for D in Ds:
        row = []
        for W in Ws:
            ok = [T for T in Ts if by[(T, D, W)]["allgather_frac"] < 0.01]
            row.append(f"T >= {_fmt_T(ok[0])}" if ok else "-")
        lines.append(f"| {D} | " + " | ".join(row) + " |")
    lines += ["", "Log-depth prefix scan (not implemented), same cells at T=1M: "
              + "; ".join(f"D={D} W={W}: {by[(Ts[0], D, W)]['logscan_ms']:.3g} ms "
                          f"({100 * by[(Ts[0], D, W)]['logscan_frac']:.2g}%)"
                          for D in (Ds[0], Ds[-1]) for W in (Ws[-1],)), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="MODEL of the context-parallel state exchange vs compute")
    p.add_argument("--T", default="1,4,16,64", help="sequence lengths in Mi tokens")
    p.add_argument("--D", default="1024,2048,4096,8192")
    p.add_argument("--W", default="2,4,8,16,32,64")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    Ts = [int(t) << 20 for t in a.T.split(",")]
    Ds = [int(d) for d in a.D.split(",")]
    Ws = [int(w) for w in a.W.split(",")]
    pts = grid(Ts, Ds, Ws)
    md = markdown(pts, Ts, Ds, Ws)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"kind": "MODEL (not a measurement)", "constants": {k: {"value": v, "source": s}
                                                                          for k, (v, s) in CONSTANTS.items()},
                       "points": pts}, f, indent=1)
            f.write("\n")
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if not (a.json or a.md):
        print(md)
    else:
        print(md, file=sys.stderr)


if __name__ == "__main__":
    main()
