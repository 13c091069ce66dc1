"""Evaluation: mean next-token cross-entropy over non-overlapping windows.

Protocol (that of the reference checkpoint's README): the validation set is the last
``val_fraction`` of the token stream (split index ``int(n_tokens * (1 - val_fraction))``; for a
char tokenizer tokens are characters, so this is the character split); it is cut into consecutive
non-overlapping windows of ``window`` tokens, each run from a zero state, inputs the window's
tokens and targets the next tokens; the tail that does not fill a window is dropped; the score
is the mean cross-entropy over every scored token.

    python -m kop_triton.eval --checkpoint DIR --text FILE [--val-fraction 0.1] [--window 2048]
                              [--batch-size 8] [--backend auto] [--device cpu] [--rosa exact|reference]

prints one JSON line: {"val_ce": ..., "val_ppl": ..., "tokens": ..., "windows": ...}.
A ROSA model computes ROSA from each window's own ids; ``--rosa`` switches a ROSA model between
the reference implementation's automaton and the exact definition (same weights).
"""
from __future__ import annotations

if __name__ == "__main__":   # python -m kop_triton.eval: run as the console script does, before the slow
    import sys               # imports, so that a Ctrl-C even during them ends with one line, exit 130
    from kop_triton.cli import run_tool
    sys.exit(run_tool("kop-eval", "kop_triton.eval"))

import json
import math
import sys

import torch

from .cli import ArgumentParser, fail
from .data import read_text
from .ops._checks import BACKENDS, check_int

PROG = "kop-eval"
PPL_CAP_CE = 50.0   # perplexity() caps the exponent here: a diverged run logs a large number, not inf


def perplexity(ce: float) -> float:
    """exp(ce), the exponent capped at 50 (exp(50) ~ 5e21) so it never overflows."""
    return math.exp(min(ce, PPL_CAP_CE))


def evaluate(model, ids, window: int = 2048, batch_size: int = 8) -> dict:
    """Mean CE of ``model`` over the non-overlapping ``window``-token windows of ``ids`` (1-D)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be a 1-D int tensor, got {type(ids).__name__} "
                         f"{getattr(ids, 'shape', '')} {getattr(ids, 'dtype', '')}")
    check_int("window", window, low=1)
    check_int("batch_size", batch_size, low=1)
    n_windows = (ids.numel() - 1) // window
    if n_windows < 1:
        raise ValueError(f"need at least window + 1 = {window + 1} tokens to score one window, "
                         f"got {ids.numel()}")
    device = next(model.parameters()).device
    ids = ids.to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, n_windows, batch_size):
                idx = torch.arange(start, min(start + batch_size, n_windows), device=device)
                pos = idx[:, None] * window + torch.arange(window, device=device)[None]   # (b, W)
                x, y = ids[pos], ids[pos + 1]
                loss = model(x, y)
                total += float(loss.double()) * y.numel()
    finally:
        model.train(was_training)
    tokens = n_windows * window
    ce = total / tokens
    return {"val_ce": ce, "val_ppl": perplexity(ce), "tokens": tokens, "windows": n_windows}


def validation_ids(tokenizer, text: str, val_fraction: float = 0.1) -> torch.Tensor:
    """The last ``val_fraction`` of the encoded text as a 1-D long tensor."""
    if not (0.0 < val_fraction <= 1.0):
        raise ValueError(f"val_fraction must be in (0, 1], got {val_fraction}")
    ids = tokenizer.encode(text)
    split = int(len(ids) * (1.0 - val_fraction))
    return torch.tensor(ids[split:], dtype=torch.long)


def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG, description="Evaluate a kop-triton checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--text", required=True, help="UTF-8 text file; the last --val-fraction is scored")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default=None, choices=BACKENDS, help="override the checkpoint's backend")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--rosa", default=None, choices=("exact", "reference"),
                   help="override how a ROSA model computes ROSA")
    a = p.parse_args(argv)
    from .checkpoint import CheckpointError, load_checkpoint
    try:
        if not 0.0 < a.val_fraction <= 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1], got {a.val_fraction}")
        if a.window < 1 or a.batch_size < 1:
            raise ValueError(f"--window and --batch-size must be positive, got {a.window} and {a.batch_size}")
        from .distributed import resolve_device
        device = resolve_device(a.device)
        text = read_text(a.text, "--text", ValueError)
        model, tok = load_checkpoint(a.checkpoint, map_location=device)
        if a.backend is not None:
            model.set_backend(a.backend)
        if a.rosa is not None:
            model.set_rosa(a.rosa)
        res = evaluate(model, validation_ids(tok, text, a.val_fraction), a.window, a.batch_size)
    except (CheckpointError, ValueError, OSError) as e:
        return fail(PROG, e)
    print(json.dumps(res))
    return 0

