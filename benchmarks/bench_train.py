"""Whole training step of the K-Stack LM, ours and the reference implementation's own model, side
by side in one process (issue 14): forward + backward + AdamW, tokens per second.

    python -m benchmarks.bench_train --json -                          # ours only (reference skipped)
    python -m benchmarks.bench_train --reference-dir .ref --threads 1,2 --json train.json

Configuration: the reference's v2 Tiny Shakespeare model (vocabulary 65, d_model 64, 6 K2 blocks,
rank 4, one shared 8-tap kernel, gamma in [0.05, 1], tied linear head), batch 4 x 2048 by default,
the v2 dropouts (embedding 0.08, MLP 0.10, residual 0.05) in both models, and the same AdamW
(lr 1e-2, betas (0.8, 0.999), weight decay 0.02) on every parameter.  Random token ids: the
throughput does not depend on the text.

The reference is not a dependency of this project: it is imported only from a local copy given with
``--reference-dir`` (a directory holding its ``k_language_model`` package, e.g. extracted from
github.com/AileenKoneko/K-language-model), and skipped otherwise, saying so in the JSON.  Its model is
built through its own ``KStackModel`` with ``decay_impl`` "block" (its linear path) and "mask" (its
default quadratic path), ROSA off.

Timing: after one untimed step per method, rounds in which every method runs one timed step in turn
(so a load change on a shared machine hits all of them alike); tokens/s from the median step time,
and from the fastest step ("best", the least disturbed by other jobs on a shared machine).
The "mask" model takes seconds per step, so it runs in the first ``--mask-steps`` rounds only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from . import cli
from . import harness as H

V2 = dict(vocab_size=65, d_model=64, n_k2=6, rank=4, kernel_size=8, gamma_min=0.05, gamma_max=1.0,
          alpha_cap=1.0, emb_dropout=0.08, mlp_dropout=0.10, residual_dropout=0.05)
ADAMW = dict(lr=1e-2, betas=(0.8, 0.999), weight_decay=0.02)


def build_ours(window: int):
    from kop_triton.model import KStackConfig, KStackLM
    c = V2
    return KStackLM(KStackConfig(vocab_size=c["vocab_size"], d_model=c["d_model"], n_k2=c["n_k2"],
                                 rank=c["rank"], kernel_size=c["kernel_size"], shared_kernel=True,
                                 gamma_min=c["gamma_min"], gamma_max=c["gamma_max"], alpha_cap=c["alpha_cap"],
                                 head="linear", emb_dropout=c["emb_dropout"], mlp_dropout=c["mlp_dropout"],
                                 residual_dropout=c["residual_dropout"], window=window, backend="chunked"))


def import_reference(ref_dir: str):
    """The reference's ``KStackModel`` from a local copy, or raise ImportError saying why."""
    if not os.path.isdir(os.path.join(ref_dir, "k_language_model")):
        raise ImportError(f"no k_language_model package under --reference-dir {ref_dir!r}")
    if ref_dir not in sys.path:
        sys.path.insert(0, os.path.abspath(ref_dir))
    from k_language_model.kstack import KStackModel
    return KStackModel


def build_reference(KStackModel, window: int, decay_impl: str):
    c = V2
    return KStackModel(vocab_size=c["vocab_size"], window=window, d=c["d_model"], emb_dim=None, rank=c["rank"],
                       n_k2=c["n_k2"], emb_dropout=c["emb_dropout"], mlp_dropout=c["mlp_dropout"],
                       residual_dropout=c["residual_dropout"], share_k_base=True,
                       k_base_kernel_size=c["kernel_size"], head_mode="linear", head_dropout=0.0,
                       alpha_cap=c["alpha_cap"], gamma_min=c["gamma_min"], gamma_max=c["gamma_max"],
                       decay_impl=decay_impl, rosa_impl="off")


class Trainer:
    """One model, its AdamW and a fixed batch; ``step()`` is one timed training step."""

    def __init__(self, name: str, model, x, y):
        self.name, self.model, self.x, self.y = name, model, x, y
        self.model.train()
        self.opt = torch.optim.AdamW(model.parameters(), **ADAMW)
        self.times, self.losses = [], []
        self.parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step(self, timed: bool = True) -> None:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(self.x, self.y)
        loss.backward()
        self.opt.step()
        dt = time.perf_counter() - t0
        self.losses.append(float(loss.detach()))
        if timed:
            self.times.append(dt)


def run_threads(threads: int, trainers, rounds: int, mask_steps: int, tokens: int, log) -> dict:
    torch.set_num_threads(threads)
    for t in trainers:
        t.times = []
        t.step(timed=False)                                   # warm-up (allocator, first-call paths)
    for r in range(rounds):
        for t in trainers:
            if t.name.endswith("mask") and r >= mask_steps:
                continue
            t.step()
        log(f"threads={threads} round {r + 1}/{rounds}: "
            + ", ".join(f"{t.name} {tokens / t.times[-1]:.0f} tok/s" for t in trainers if t.times))
    out = {}
    for t in trainers:
        med, best = statistics.median(t.times), min(t.times)
        out[t.name] = {"step_s": t.times, "median_step_s": med, "tokens_per_s": tokens / med,
                       "min_step_s": best, "tokens_per_s_best": tokens / best, "parameters": t.parameters}
    for name in out:
        if name != "ours":
            out[name]["ours_speedup"] = out["ours"]["tokens_per_s"] / out[name]["tokens_per_s"]
            out[name]["ours_speedup_best"] = out["ours"]["tokens_per_s_best"] / out[name]["tokens_per_s_best"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", default=None,
                   help="directory holding the reference implementation's k_language_model package")
    p.add_argument("--threads", type=cli.int_list, default=[1], help="comma-separated torch thread counts")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--mask-steps", type=int, default=2, help="timed steps of the slow reference 'mask' model")
    p.add_argument("--decays", type=cli.str_list, default=["block", "mask"],
                   help="reference decay implementations to run")
    p.add_argument("--note", default=None)
    p.add_argument("--json", default=None, help="write the JSON here ('-' for stdout)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.batch < 1 or args.window < 1 or args.rounds < 1:
        raise ValueError(f"--batch, --window and --rounds must be >= 1, got {args.batch}, {args.window}, {args.rounds}")

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    device = torch.device("cpu")
    load0 = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V2["vocab_size"], (args.batch, args.window + 1), generator=g)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    torch.manual_seed(0)
    trainers = [Trainer("ours", build_ours(args.window), x, y)]
    reference = {"status": "skipped", "reason": "skipped: no --reference-dir given (the reference is not a "
                 "dependency of this project)"}
    if args.reference_dir:
        try:
            KStackModel = import_reference(args.reference_dir)
            for impl in args.decays:
                torch.manual_seed(0)
                trainers.append(Trainer(f"reference_{impl}", build_reference(KStackModel, args.window, impl), x, y))
            reference = {"status": "ok", "dir": os.path.abspath(args.reference_dir), "decays": args.decays}
        except ImportError as exc:
            reference = {"status": "skipped", "reason": f"skipped: {exc}"}
    log(f"reference: {reference.get('reason', 'ok')}")
    results = {}
    for n in args.threads:
        results[str(n)] = run_threads(n, trainers, args.rounds, args.mask_steps, args.batch * args.window, log)
    doc = {
        "schema": "kop-triton/bench_train/1",
        "created": H.now_iso(),
        "command": H.command_line(),
        "machine": H.machine_info(device),
        "load_average_start": load0,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": dict(V2, shared_kernel=True, head="linear", batch=args.batch, window=args.window,
                       optimizer=dict(ADAMW, name="AdamW"), data="random token ids"),
        "reference": reference,
        "note": args.note,
        "results": results,
    }
    for n, res in results.items():
        log(f"threads={n}: " + ", ".join(
            f"{k} {v['tokens_per_s']:.0f} tok/s (best {v['tokens_per_s_best']:.0f})"
            + (f" ours {v['ours_speedup']:.2f}x (best {v['ours_speedup_best']:.2f}x)" if "ours_speedup" in v else "")
            for k, v in res.items()))
    if args.json == "-":
        json.dump(doc, sys.stdout, indent=1)
        print()
    elif args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
