"""HF ``generate`` tokens/s at several contexts, each way of growing the sequence, measured round-robin.

    python -m benchmarks.bench_hf_append [--contexts 2048,100000] [--rounds 8] [--new 256] [--out FILE]

On a shared machine the load changes between the rows of ``bench_decode``; here every
(context, variant) pair is measured once per round, in turn, so each round sees about the same
load for all of them and their ratios can be compared.  Variants of ``KStackForCausalLM.generate``
(greedy, batch 1, one thread, the ``bench_decode`` model and timing: the loop between the first
and the last score call):
  default   as shipped: the sequence grows in place from ``hf.GROW_IN_PLACE_FROM`` ids
  in_place  it always grows in place (``GROW_IN_PLACE_FROM = 0``)
  copy      transformers' own loop as is: each token copies the sequence (``torch.cat``)
Prints, and writes as JSON to ``--out``, the best and the median rate (tokens per second of wall
time and per CPU-second of this process) of each pair, and the load average.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="2048,100000")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.bench_decode import _copy_append, _model, hf_generate
    from kop_triton import hf
    model, desc = _model(None)
    m = hf.KStackForCausalLM.from_kstack(model).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = {int(T): torch.randint(0, model.config.vocab_size, (1, int(T)), generator=gen)
               for T in a.contexts.split(",")}
    default_from = hf.GROW_IN_PLACE_FROM

    @contextlib.contextmanager
    def variant(name):
        if name == "copy":
            with _copy_append(m):
                yield
            return
        hf.GROW_IN_PLACE_FROM = 0 if name == "in_place" else default_from
        try:
            yield
        finally:
            hf.GROW_IN_PLACE_FROM = default_from

    rates, ref = {}, {}
    load = [list(os.getloadavg())]
    for T, prompt in prompts.items():                          # warm-up, and the tokens to compare
        ref[T] = hf_generate(m, prompt, 8)[0]
    for _ in range(a.rounds):
        for T, prompt in prompts.items():
            for name in ("default", "in_place", "copy"):
                with variant(name):
                    toks, _, wall, cpu = hf_generate(m, prompt, a.new)
                assert torch.equal(toks[:, :8], ref[T]), (T, name)
                rates.setdefault(f"{T} {name}", []).append(((a.new - 1) / wall, (a.new - 1) / cpu))
        load.append(list(os.getloadavg()))
    out = {"model": desc, "grow_in_place_from": default_from, "new_tokens": a.new, "rounds": a.rounds,
           "load_average_per_round": load, "command": "python -m benchmarks.bench_hf_append " + " ".join(
               sys.argv[1:] if argv is None else argv), "rates": {}}
    print(f"tokens/s, {a.rounds} rounds (best / median; per CPU-second in brackets); load {load[0][0]:.2f}"
          f" -> {load[-1][0]:.2f}")
    for k, v in rates.items():
        w, c = [x for x, _ in v], [y for _, y in v]
        out["rates"][k] = {"best": max(w), "median": statistics.median(w), "best_cpu": max(c),
                           "median_cpu": statistics.median(c), "all": w}
        print(f"{k:>16}: {max(w):7,.0f} / {statistics.median(w):7,.0f}  ({max(c):7,.0f} / {statistics.median(c):7,.0f})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
