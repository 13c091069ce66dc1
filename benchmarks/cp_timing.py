"""Context parallelism on this CPU: a KOperator forward + backward over a sequence split across W gloo
ranks (``kop_triton.context_parallel``) against the same sequence in one process.

Rounds alternate: rank 0 alone runs the whole sequence (the other ranks wait at a barrier), then every
rank runs its shard with the state exchange, once per exchange ("allgather", "pipeline"); each rank
uses ``--threads`` torch threads (1 by default, so W ranks use W cores).  CPU seconds
(``time.process_time``) are recorded beside the wall times: on a shared machine the wall time also
measures how many cores the ranks got.  Also timed: the exchange alone (the all-gather of the
per-rank state payload and its backward all-to-all; or the send/recv chain forward and back), 20
times per round.  A CP time is the slowest rank's.  Medians over the rounds.

    python -m benchmarks.cp_timing --T 16384 --D 256 --R 16 --world 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(mod, x):
    x = x.clone().requires_grad_()
    y = mod(x)
    y.square().mean().backward()
    return x.grad


def _worker(rank, world, port, a, out_dir):
    from kop_triton.context_parallel import EXCHANGES, ContextParallel, _ChainStates, _GatherStates, context_parallel, \
        shard_sizes
    from kop_triton.modules import KOperator
    torch.set_num_threads(a.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    mod = KOperator(a.D, rank=a.R, kernel_size=a.K, backend="chunked")
    x = torch.randn(1, a.T, a.D)
    cps = {e: ContextParallel(sizes=shard_sizes(a.T, world), exchange=e) for e in EXCHANGES}
    xs = cps["allgather"].shard(x)
    n_payload = a.R * a.D + (a.K - 1) * a.D
    payload = torch.randn(n_payload, requires_grad=True)
    S_loc = torch.randn(1, a.R, a.D, requires_grad=True)
    tail = torch.randn(1, a.K - 1, a.D, requires_grad=True)
    A = torch.rand(a.R, requires_grad=True)
    keep = torch.ones(a.K - 1)
    m = min(a.T // world, a.K - 1)

    def exchange_once(e):
        if e == "allgather":
            _GatherStates.apply(payload, None).sum().backward()
        else:
            s_in, c_in = _ChainStates.apply(S_loc, A, tail, None, rank, world, m, 1.0, keep)
            (s_in.sum() + c_in.sum()).backward()

    single, single_cpu = [], []
    cpt, exch, cp_cpu = ({e: [] for e in EXCHANGES} for _ in range(3))
    for rnd in range(a.rounds + 1):                 # round 0: warm-up, not recorded
        dist.barrier()
        if rank == 0:
            t0, c0 = time.perf_counter(), time.process_time()
            _step(mod, x)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        dist.barrier()
        if rnd:
            single.append(dt if rank == 0 else 0.0)
            single_cpu.append(dc if rank == 0 else 0.0)
        mod.zero_grad(set_to_none=True)
        for e in EXCHANGES:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            with context_parallel(mod, cps[e]):
                _step(mod, xs)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            mod.zero_grad(set_to_none=True)
            if rnd:
                cpt[e].append(dt)
                cp_cpu[e].append(dc)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(20):
                exchange_once(e)
            if rnd:
                exch[e].append((time.perf_counter() - t0) / 20)
    res = dict(single_s=statistics.median(single) if rank == 0 else None, single_all=single,
               single_cpu_s=statistics.median(single_cpu) if rank == 0 else None, payload_bytes=4 * n_payload)
    for e in EXCHANGES:
        worst = torch.tensor([cpt[e], exch[e]], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        cpu_sum = torch.tensor(cp_cpu[e], dtype=torch.float64)
        cpu_max = cpu_sum.clone()
        dist.all_reduce(cpu_sum)                       # CPU seconds of all ranks together, per round
        dist.all_reduce(cpu_max, op=dist.ReduceOp.MAX)  # and of the busiest rank
        res[e] = dict(cp_s=statistics.median(worst[0].tolist()), exchange_s=statistics.median(worst[1].tolist()),
                      cp_all=worst[0].tolist(), exchange_all=worst[1].tolist(),
                      cp_cpu_s_all_ranks=statistics.median(cpu_sum.tolist()),
                      cp_cpu_s_busiest_rank=statistics.median(cpu_max.tolist()))
    if rank == 0:
        with open(os.path.join(out_dir, "res.json"), "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--R", type=int, default=16)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--note", default="")
    p.add_argument("--json", default="-")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(a.world, _port(), a, tmp), nprocs=a.world, start_method="spawn")
        with open(os.path.join(tmp, "res.json")) as f:
            res = json.load(f)
    for e in ("allgather", "pipeline"):
        r = res[e]
        r.update(ratio_cp_over_single=r["cp_s"] / res["single_s"],
                 cpu_ratio_all_ranks_over_single=r["cp_cpu_s_all_ranks"] / res["single_cpu_s"],
                 cpu_ratio_busiest_rank_over_single=r["cp_cpu_s_busiest_rank"] / res["single_cpu_s"],
                 exchange_fraction_of_cp=r["exchange_s"] / r["cp_s"])
    res.update(shape=dict(B=1, T=a.T, D=a.D, R=a.R, K=a.K), world=a.world, threads_per_rank=a.threads,
               backend="chunked", load_average=os.getloadavg(),
               machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count()),
               torch=torch.__version__, note=a.note, command="python -m benchmarks.cp_timing " + " ".join(
                   sys.argv[1:] if argv is None else argv))
    text = json.dumps(res, indent=1)
    if a.json == "-":
        print(text)
    else:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    for e in ("allgather", "pipeline"):
        r = res[e]
        print(f"T={a.T} D={a.D} R={a.R} W={a.world} {e}: single {res['single_s'] * 1e3:.1f} ms, "
              f"CP {r['cp_s'] * 1e3:.1f} ms (ratio {r['ratio_cp_over_single']:.3f}); CPU s: single "
              f"{res['single_cpu_s']:.3f}, CP all ranks {r['cp_cpu_s_all_ranks']:.3f} (ratio {r['cpu_ratio_all_ranks_over_single']:.3f}), busiest rank "
              f"{r['cp_cpu_s_busiest_rank']:.3f} (ratio {r['cpu_ratio_busiest_rank_over_single']:.3f}); exchange "
              f"alone {r['exchange_s'] * 1e3:.3f} ms", file=sys.stderr)


if __name__ == "__main__":
    main()
