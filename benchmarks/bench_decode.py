"""Decode speed of KStackLM vs context length: the recurrent step, re-running the window, HF generate.

    python -m benchmarks.bench_decode [--checkpoint DIR] [--contexts 2048,16384,100000] [--batches 1,64]
                                      [--new 256] [--window-new 4] [--window 2048] [--threads 1]
                                      [--repeats 3] [--out benchmarks/results/decode] [--no-hf]
                                      [--hf-copy-append] [--hf-grow-from N]

For each batch size and prompt length ("context"), greedy decoding, three ways:
  recurrent  ``KStackLM.prefill`` (parallel form, once) then one ``KStackLM.step`` per token: the
             state is constant-size, so tokens/s should not depend on the context;
  window     what the reference implementation does: every new token re-runs the model on the last
             ``--window`` tokens of the sequence and keeps the last logits (no state);
  hf         ``KStackForCausalLM.generate`` (transformers, ``do_sample=False``): its prefill, then its
             cache path, whose token steps run the model's prepared step (``PreparedStep.step_lists``);
             with ``--hf-copy-append`` also with transformers' own loop as is (each token copies the
             sequence: ``hf_copy_append_*``), interleaved with the default run.
tokens/s counts generated tokens over batch x time of the decode loop only (prefill timed
separately); for hf the loop is timed by a logits processor that notes each token's score call
(B x (N - 1) tokens between the first and the last).  Each rate is also given per CPU-second of
this process (``*_per_cpu_s``, ``time.process_time``, one thread): on a machine shared with other
jobs that is close to what a dedicated core gives, while the wall-time rate is what this run saw.  The recurrent and hf
tokens are checked equal.  Each path is measured ``--repeats`` times (the recurrent loop from the
same prefilled state, the others whole) and the best rate is reported beside the list of all
(``*_tokens_per_s_all``): on a shared machine the best is the least disturbed run.  The load
average is recorded at the start, per row and at the end.  ``first_token_s`` /
``hf_first_token_s``: the first ``KStackLM.generate`` / ``KStackForCausalLM.generate`` call of a
fresh Python process (a subprocess; prompt of 16, two new tokens, so the step plan is built and
scripted in it): what a fresh process waits for its first tokens.  Prompts longer
than ``--prefill-chunk`` x batch tokens are prefilled in row groups (same states, bounded memory).
The model is the checkpoint given or, without one, a randomly initialised model in the reference v2
configuration (vocab 65, d 64, 6 K2, rank 4, kernel 8; speed does not depend on the weights).
Writes ``decode.json`` and ``decode.png`` to ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch


def _model(checkpoint):
    from kop_triton import KStackConfig, KStackLM
    if checkpoint:
        from kop_triton.checkpoint import load_checkpoint
        model, _ = load_checkpoint(checkpoint)
        return model.eval(), str(checkpoint)
    torch.manual_seed(0)
    model = KStackLM(KStackConfig(vocab_size=65, d_model=64, n_k2=6, rank=4, kernel_size=8))
    return model.eval(), "random init, reference v2 config (vocab 65, d 64, 6 K2 layers, rank 4, kernel 8)"


@torch.no_grad()
def prefill(model, prompt, max_tokens):
    """model.prefill of (B, T) in row groups of at most max_tokens tokens -> (last logits, state)."""
    rows = max(1, max_tokens // prompt.shape[1])
    parts = [model.prefill(prompt[i:i + rows]) for i in range(0, prompt.shape[0], rows)]
    if len(parts) == 1:
        return parts[0]
    logits = torch.cat([p[0] for p in parts])
    state = tuple(type(s)(*(torch.cat([p[1][j][f] for p in parts]) for f in range(len(s))))
                  for j, s in enumerate(parts[0][1]))
    return logits, state


@torch.no_grad()
def recurrent(model, prompt, new, max_tokens, repeats=1):
    """-> (new tokens, prefill s, [(decode wall s, decode CPU s)] for each repeat from the same state)."""
    t0 = time.perf_counter()
    logits0, state0 = prefill(model, prompt, max_tokens)
    t_pre = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t1, c1 = time.perf_counter(), time.process_time()
        out = []
        logits, state = logits0, state0
        nxt = logits.argmax(-1)
        for _ in range(new):
            out.append(nxt)
            logits, state = model.step(nxt, state)
            nxt = logits.argmax(-1)
        times.append((time.perf_counter() - t1, time.process_time() - c1))
    return torch.stack(out, 1), t_pre, times


@torch.no_grad()
def window(model, prompt, new, win):
    seq = prompt[:, -win:]
    out = []
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(new):
        nxt = model(seq[:, -win:])[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq[:, -win:], nxt], 1)
        out.append(nxt)
    return torch.cat(out, 1), time.perf_counter() - t0, time.process_time() - c0


class _StepClock:
    """A logits processor that only records when generate() asks for each new token's scores."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append((time.perf_counter(), time.process_time()))
        return scores


def hf_generate(hf_model, prompt, new):
    """-> (new tokens, total s, decode-loop wall s and CPU s over new - 1 steps: first to last score call)."""
    from transformers import LogitsProcessorList
    clock = _StepClock()
    t0 = time.perf_counter()
    out = hf_model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            logits_processor=LogitsProcessorList([clock]))
    (w0, c0), (w1, c1) = clock.times[0], clock.times[-1]
    return out[:, prompt.shape[1]:], time.perf_counter() - t0, w1 - w0, c1 - c0


@contextlib.contextmanager
def _copy_append(hf_model):
    """generate() with transformers' own loop as is (``GenerationMixin._sample``: each token copies
    the whole sequence with torch.cat) instead of KStackForCausalLM's in-place growing sequence."""
    from transformers import GenerationMixin
    cls = type(hf_model)
    own = cls.__dict__["_sample"]
    cls._sample = GenerationMixin._sample
    try:
        yield
    finally:
        cls._sample = own


_FIRST = """
import sys, time, torch
torch.set_num_threads({threads})
sys.argv = ["bench_decode"]
from benchmarks.bench_decode import _model
model, _ = _model({checkpoint!r})
prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
if {hf}:
    from kop_triton.hf import KStackForCausalLM
    model = KStackForCausalLM.from_kstack(model).eval()
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=2, do_sample=False)
else:
    t0 = time.perf_counter()
    model.generate(prompt, 2, temperature=0)
print("FIRST", time.perf_counter() - t0)
"""


def first_tokens_s(args, hf: bool) -> float:
    """The first generate call (prompt 16, 2 new tokens) of a fresh Python process, in seconds."""
    import subprocess
    code = _FIRST.format(threads=args.threads, checkpoint=args.checkpoint, hf=hf)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, check=True)
    return float(res.stdout.split("FIRST")[-1])


def _best(times, n):
    """[(wall s, CPU s)] of repeats -> (best wall rate, best CPU rate, all wall rates) for n tokens."""
    return max(n / w for w, _ in times), max(n / c for _, c in times), [n / w for w, _ in times]


def run(args):
    load_start = list(os.getloadavg())
    model, desc = _model(args.checkpoint)
    hf_model = None
    if not args.no_hf:
        from kop_triton import hf
        if args.hf_grow_from is not None:
            hf.GROW_IN_PLACE_FROM = args.hf_grow_from
        hf_model = hf.KStackForCausalLM.from_kstack(model).eval()
    gen = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    first_token_s = first_tokens_s(args, hf=False)
    hf_first_token_s = None if hf_model is None else first_tokens_s(args, hf=True)
    rows = []
    for B in args.batches:
        for T in args.contexts:
            if B * T > args.max_prompt_tokens:
                print(f"skip batch {B} x context {T}: over --max-prompt-tokens {args.max_prompt_tokens}", flush=True)
                continue
            prompt = torch.randint(0, V, (B, T), generator=gen)
            recurrent(model, prompt[:, -64:], 8, args.prefill_chunk)             # warm-up
            toks, t_pre, times = recurrent(model, prompt, args.new, args.prefill_chunk, args.repeats)
            rate, cpu_rate, rates = _best(times, B * args.new)
            row = {"batch": B, "context": T, "prefill_s": t_pre, "recurrent_decode_s": B * args.new / rate,
                   "recurrent_tokens_per_s": rate, "recurrent_tokens_per_cpu_s": cpu_rate,
                   "recurrent_tokens_per_s_all": rates, "prefill_tokens_per_s": B * T / t_pre}
            window(model, prompt, 1, args.window)                                 # warm-up
            times = []
            for _ in range(args.repeats):
                win_toks, t_win, c_win = window(model, prompt, args.window_new, args.window)
                times.append((t_win, c_win))
            rate, cpu_rate, rates = _best(times, B * args.window_new)
            row.update(window_tokens_per_s=rate, window_tokens_per_cpu_s=cpu_rate, window_tokens_per_s_all=rates,
                       window_s=B * args.window_new / rate, window_new=args.window_new)
            if T + args.window_new <= args.window:                                # the window sees everything
                row["window_equal_recurrent"] = bool(torch.equal(win_toks, toks[:, :args.window_new]))
            if hf_model is not None and B * T <= args.hf_max_prompt_tokens:
                times, copy_times, equal = [], [], True
                for _ in range(args.repeats):
                    hf_toks, t_all, t_loop, c_loop = hf_generate(hf_model, prompt, args.new)
                    times.append((t_loop, c_loop))
                    equal = equal and bool(torch.equal(hf_toks, toks))
                    if args.hf_copy_append:                 # interleaved: the same load for both
                        with _copy_append(hf_model):
                            hf_toks, _, t_loop, c_loop = hf_generate(hf_model, prompt, args.new)
                        copy_times.append((t_loop, c_loop))
                        equal = equal and bool(torch.equal(hf_toks, toks))
                rate, cpu_rate, rates = _best(times, B * (args.new - 1))
                row.update(hf_tokens_per_s=rate, hf_tokens_per_cpu_s=cpu_rate, hf_tokens_per_s_all=rates,
                           hf_generate_s=t_all, hf_equal_recurrent=equal)
                if copy_times:
                    rate, cpu_rate, rates = _best(copy_times, B * (args.new - 1))
                    row.update(hf_copy_append_tokens_per_s=rate, hf_copy_append_tokens_per_cpu_s=cpu_rate,
                               hf_copy_append_tokens_per_s_all=rates)
            row["load_average"] = list(os.getloadavg())
            rows.append(row)
            print(json.dumps(row), flush=True)
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {"model": desc, "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": hf_version,
            "load_average_at_start": load_start, "load_average_at_end": list(os.getloadavg()), "cpus": os.cpu_count(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "new_tokens": args.new,
            "window": args.window, "repeats": args.repeats, "first_token_s": first_token_s,
            "hf_first_token_s": hf_first_token_s, "note": args.note, "hf_grow_in_place_from": _grow_from(),
            "command": "python -m benchmarks.bench_decode " + " ".join(shlex.quote(a) for a in args.argv),
            "rows": rows}


def _grow_from():
    try:
        from kop_triton import hf
    except ImportError:
        return None
    return hf.GROW_IN_PLACE_FROM


def table(res) -> str:
    lines = [f"tokens/s of wall time, best of {res['repeats']} (tokens per CPU-second of this process in brackets):",
             "",
             "| batch | context | recurrent (ours) | re-run window | HF generate | prefill s | load (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        hf = (f"{r['hf_tokens_per_s']:,.0f} ({r['hf_tokens_per_cpu_s']:,.0f})" if "hf_tokens_per_s" in r else "-")
        if "hf_copy_append_tokens_per_s" in r:
            hf += (f"; copying append {r['hf_copy_append_tokens_per_s']:,.0f} "
                   f"({r['hf_copy_append_tokens_per_cpu_s']:,.0f})")
        lines.append(f"| {r['batch']} | {r['context']:,} | {r['recurrent_tokens_per_s']:,.0f} "
                     f"({r['recurrent_tokens_per_cpu_s']:,.0f}) | {r['window_tokens_per_s']:,.1f} "
                     f"({r['window_tokens_per_cpu_s']:,.1f}) | {hf} | {r['prefill_s']:.2f} | "
                     f"{r['load_average'][0]:.2f} |")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for B in sorted({r["batch"] for r in res["rows"]}):
        rs = [r for r in res["rows"] if r["batch"] == B]
        x = [r["context"] for r in rs]
        ax.plot(x, [r["recurrent_tokens_per_s"] for r in rs], "o-", label=f"recurrent step (ours), B={B}")
        ax.plot(x, [r["window_tokens_per_s"] for r in rs], "s--", label=f"re-run {res['window']}-token window, B={B}")
        hx = [r["context"] for r in rs if "hf_tokens_per_s" in r]
        if hx:
            ax.plot(hx, [r["hf_tokens_per_s"] for r in rs if "hf_tokens_per_s" in r], "^:", label=f"HF generate, B={B}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"KStackLM greedy decode, {res['threads']} thread(s), best of {res.get('repeats', 1)} runs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--contexts", type=_ints, default=[2048, 16384, 100000])
    p.add_argument("--batches", type=_ints, default=[1, 64])
    p.add_argument("--new", type=int, default=256, help="tokens generated per measurement")
    p.add_argument("--window-new", type=int, default=4, help="tokens generated by the (slow) window re-run")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--prefill-chunk", type=int, default=262144, help="max prompt tokens per prefill call")
    p.add_argument("--max-prompt-tokens", type=int, default=2_000_000, help="skip batch x context above this")
    p.add_argument("--hf-max-prompt-tokens", type=int, default=262144,
                   help="run HF generate only up to this many prompt tokens (its prefill is one call)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="measurements per path and row; the best is reported")
    p.add_argument("--note", default=None, help="a remark stored in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers path")
    p.add_argument("--hf-grow-from", type=int, default=None,
                   help="set kop_triton.hf.GROW_IN_PLACE_FROM (ids from which generate's sequence grows in place; "
                        "0: always)")
    p.add_argument("--hf-copy-append", action="store_true",
                   help="also time HF generate with transformers' own append (a copy of the sequence per token), "
                        "interleaved with the default path: hf_copy_append_* in the JSON")
    p.add_argument("--out", default=None, help="directory for decode.json and decode.png")
    a = p.parse_args(argv)
    if min(a.new, a.window_new, a.window, a.threads, a.repeats) < 1 or a.new < 2:
        p.error("--new must be >= 2; --window-new, --window, --threads and --repeats positive")
    torch.set_num_threads(a.threads)
    a.argv = argv
    res = run(a)
    print(table(res))
    print(f"first generate call of a fresh process (2 tokens): KStackLM {res['first_token_s']:.3f} s"
          + ("" if res["hf_first_token_s"] is None else f", HF {res['hf_first_token_s']:.3f} s"))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.json").write_text(json.dumps(res, indent=1) + "\n")
        plot(res, out / "decode.png")
        print(f"wrote {out / 'decode.json'} and {out / 'decode.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
