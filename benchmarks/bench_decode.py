"""Decode speed of KStackLM: recurrent state vs re-running the window for every token.

    python benchmarks/bench_decode.py [--checkpoint DIR] [--prompt 1024] [--new 128] [--batch 1]
                                      [--window 2048] [--device cpu] [--threads N]

Two ways to generate ``--new`` tokens greedily after a ``--prompt``-token prompt:
  recurrent  ``model.generate``: the prompt is prefilled once (parallel form, returning every K2
             mixer's state), then each token is one ``model.step`` -- O(1) per token;
  window     the usual transformer-style loop without a cache: every token re-runs the model on
             the last ``--window`` tokens and keeps the last logits -- O(window) per token.
Both produce the same greedy tokens while the context fits the window (checked and reported).
The model is the checkpoint given (e.g. the imported reference) or, without one, a randomly
initialised model in the reference v2 configuration (speed does not depend on the weights).
Prints one JSON line with tokens/s for both and the speed-up.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _model(checkpoint, device, backend):
    from kop_triton import KStackConfig, KStackLM
    if checkpoint:
        from kop_triton.checkpoint import load_checkpoint
        model, _ = load_checkpoint(checkpoint, map_location=device)
        desc = str(checkpoint)
    else:
        torch.manual_seed(0)
        model = KStackLM(KStackConfig(vocab_size=65, d_model=64, n_k2=6, rank=4, kernel_size=8)).to(device)
        desc = "random init, reference v2 config (vocab 65, d 64, 6 K2 layers, rank 4, kernel 8)"
    if backend:
        model.set_backend(backend)
    return model.eval(), desc


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def window_decode(model, prompt, new_tokens, window):
    seq = prompt
    for _ in range(new_tokens):
        logits = model(seq[:, -window:])[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


def run(checkpoint=None, prompt_len=1024, new_tokens=128, batch=1, window=2048, device="cpu", backend=None):
    device = torch.device(device)
    model, desc = _model(checkpoint, device, backend)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    model.generate(prompt[:, :16], 4, temperature=0)          # warm-up
    window_decode(model, prompt[:, :16], 2, window)
    _sync(device)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits, state = model.prefill(prompt)
        _sync(device)
        t_prefill = time.perf_counter() - t0
        out = [prompt]
        for i in range(new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt[:, None])
            if i + 1 < new_tokens:
                logits, state = model.step(nxt, state)
        _sync(device)
        t_rec = time.perf_counter() - t0
    rec = torch.cat(out, dim=1)
    assert torch.equal(rec, model.generate(prompt, new_tokens, temperature=0))
    t0 = time.perf_counter()
    win = window_decode(model, prompt, new_tokens, window)
    _sync(device)
    t_win = time.perf_counter() - t0
    n = batch * new_tokens
    agree = float((rec[:, prompt_len:] == win[:, prompt_len:]).float().mean())
    return {"model": desc, "device": str(device), "threads": torch.get_num_threads(), "batch": batch,
            "prompt": prompt_len, "new_tokens": new_tokens, "window": window,
            "backend": model.config.backend,
            "recurrent_tokens_per_s": n / t_rec, "recurrent_s": t_rec, "prefill_s": t_prefill,
            "step_tokens_per_s": batch * max(new_tokens - 1, 1) / max(t_rec - t_prefill, 1e-9),
            "window_tokens_per_s": n / t_win, "window_s": t_win, "speedup": t_win / t_rec,
            "greedy_agreement": agree,
            "note": "recurrent time includes the prefill of the prompt; window = re-run the last "
                    "`window` tokens per new token (no cache)"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if min(a.prompt, a.new, a.batch, a.window) < 1:
        p.error("--prompt, --new, --batch and --window must be positive")
    print(json.dumps(run(a.checkpoint, a.prompt, a.new, a.batch, a.window, a.device, a.backend)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
