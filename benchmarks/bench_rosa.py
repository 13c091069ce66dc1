"""ROSA throughput, exact-vs-reference disagreement on text, and generation speed with ROSA on.

    python -m benchmarks.bench_rosa [--text FILE] [--batch 32] [--window 2048] [--threads 1,2]
                                    [--repeats 30] [--new 256] [--json FILE]

- ``batch``: ``kop_triton.rosa.rosa_next_ids`` on a (batch, window) training batch of the text's
  char ids (random windows), each mode and thread count, median and best of ``repeats`` calls
  (tokens/s = batch * window / time);
- ``disagreement``: the fraction of positions where "exact" and "reference" differ, over the
  whole text and over its validation split cut into consecutive ``window``-token windows (the
  scoring protocol);
- ``stream``: the whole text as one sequence (unbounded history), through the C automaton in one
  call and through ``RosaStream.push`` one token at a time (what generation does), tokens/s;
- ``generate``: ``KStackLM.generate`` (greedy, batch 1, chunked backend, a 256-token prompt then
  ``--new`` tokens) of the v2 configuration with ROSA off and with ROSA "reference", tokens/s of
  the recurrent steps, the two models alternated three times in one run (best of each).

Prints (or writes) one JSON object with the machine's load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def char_ids(path):
    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(chars)


def time_calls(fn, repeats):
    fn()                                                   # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def bench_batch(ids, vocab, batch, window, threads, repeats):
    from kop_triton.rosa import rosa_next_ids
    g = torch.Generator().manual_seed(0)
    offs = torch.randint(0, ids.numel() - window, (batch,), generator=g)
    x = ids[offs[:, None] + torch.arange(window)[None]].contiguous()
    out = []
    for mode in ("exact", "reference"):
        for n in threads:
            med, best = time_calls(lambda: rosa_next_ids(x, mode, vocab_size=vocab, num_threads=n), repeats)
            out.append({"mode": mode, "threads": n, "median_s": med, "best_s": best,
                        "tokens_per_s_median": batch * window / med, "tokens_per_s_best": batch * window / best})
    return out


def disagreement(ids, vocab, window):
    from kop_triton.rosa import rosa_next_ids

    def frac(seq):
        n = (seq.numel() // window) * window
        x = seq[:n].view(-1, window)
        e, r = rosa_next_ids(x, "exact", vocab_size=vocab), rosa_next_ids(x, "reference", vocab_size=vocab)
        return {"positions": n, "differ": int((e != r).sum()), "fraction": float((e != r).double().mean()),
                "no_match_exact": float((e < 0).double().mean()), "no_match_reference": float((r < 0).double().mean())}

    val = ids[int(ids.numel() * 0.9):]
    return {"whole_text": frac(ids), "validation": frac(val[:-1])}


def bench_stream(ids, vocab):
    from kop_triton.rosa import RosaStream, rosa_next_ids
    out = {}
    for mode in ("exact", "reference"):   # the C automaton alone: the whole text as one sequence
        t0 = time.perf_counter()
        rosa_next_ids(ids, mode, vocab_size=vocab)
        dt = time.perf_counter() - t0
        out[f"{mode}_one_sequence_c"] = {"tokens": int(ids.numel()), "seconds": dt, "tokens_per_s": ids.numel() / dt}
    for mode in ("exact", "reference"):
        s = RosaStream(1, vocab, mode)
        cols = ids.view(-1, 1)
        t0 = time.perf_counter()
        for t in range(cols.shape[0]):
            s.push(cols[t])
        dt = time.perf_counter() - t0
        out[mode] = {"tokens": int(cols.shape[0]), "seconds": dt, "tokens_per_s": cols.shape[0] / dt}
    return out


@torch.no_grad()
def bench_generate(vocab, new_tokens, prompt_len=256):
    from kop_triton import KStackConfig, KStackLM
    out = {}
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    models = {}
    for rosa in ("off", "reference"):
        torch.manual_seed(0)
        models[rosa] = KStackLM(KStackConfig(vocab_size=vocab, d_model=64, n_k2=6, rank=4, kernel_size=8,
                                             rosa=rosa, backend="chunked")).eval()
        models[rosa].generate(prompt[:, :16], 4, temperature=0)      # warm-up
    for _ in range(3):                    # alternate the two models; keep each one's best run
        for rosa, m in models.items():
            t0 = time.perf_counter()
            logits, state = m.prefill(prompt)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                logits, state = m.step(logits.argmax(-1), state)
            t2 = time.perf_counter()
            if rosa not in out or new_tokens / (t2 - t1) > out[rosa]["step_tokens_per_s"]:
                out[rosa] = {"prefill_s": t1 - t0, "steps": new_tokens, "step_tokens_per_s": new_tokens / (t2 - t1)}
    out["rosa_step_cost_ratio"] = out["off"]["step_tokens_per_s"] / out["reference"]["step_tokens_per_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text (char ids); default Tiny Shakespeare")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts for the batch timing")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--new", type=int, default=256, help="generated tokens per model in the generation timing")
    p.add_argument("--parts", default="batch,disagreement,stream,generate", help="which measurements to run")
    p.add_argument("--json", default="-", help="output file ('-': stdout)")
    a = p.parse_args(argv)
    if not Path(a.text).is_file():
        p.error(f"--text: no such file {a.text!r} (Tiny Shakespeare is expected under ../shared)")
    threads = [int(t) for t in a.threads.split(",") if t.strip()]
    parts = [t.strip() for t in a.parts.split(",") if t.strip()]
    if not parts or set(parts) - {"batch", "disagreement", "stream", "generate"}:
        p.error(f"--parts must list some of batch, disagreement, stream, generate; got {a.parts!r}")
    if min([a.batch, a.window, a.repeats, a.new] + threads) < 1:
        p.error("--batch, --window, --repeats, --new and --threads must be positive")
    torch.set_num_threads(1)                               # the model timing: one torch thread
    ids, vocab = char_ids(a.text)
    load0 = os.getloadavg()
    res = {
        "command": shlex.join([sys.executable, "-m", "benchmarks.bench_rosa", *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor(),
                    "torch": torch.__version__, "loadavg_start": load0},
        "text": str(a.text), "vocab": vocab, "tokens": int(ids.numel()),
    }
    if "batch" in parts:
        res["batch"] = {"shape": [a.batch, a.window],
                        "results": bench_batch(ids, vocab, a.batch, a.window, threads, a.repeats)}
    if "disagreement" in parts:
        res["disagreement"] = disagreement(ids, vocab, a.window)
    if "stream" in parts:
        res["stream"] = bench_stream(ids, vocab)
    if "generate" in parts:
        res["generate"] = bench_generate(vocab, a.new)
    res["machine"]["loadavg_end"] = os.getloadavg()
    text = json.dumps(res, indent=2)
    if a.json == "-":
        print(text)
    else:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
