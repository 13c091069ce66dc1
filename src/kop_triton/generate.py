"""Sample text from a checkpoint: ``python -m kop_triton.generate --checkpoint DIR --prompt TEXT``.

Prints the prompt followed by the generated continuation to stdout. Generation is O(1) per token
(the model's recurrent step); ``--seed`` makes sampling reproducible.  A ROSA model carries its
suffix automata in the state: over the whole history by default, or restarted every
``--rosa-window`` tokens as the reference's per-window ROSA.
"""
from __future__ import annotations

if __name__ == "__main__":   # python -m kop_triton.generate: run as the console script does, before the slow
    import sys               # imports, so that a Ctrl-C even during them ends with one line, exit 130
    from kop_triton.cli import run_tool
    sys.exit(run_tool("kop-generate", "kop_triton.generate"))

import argparse
import math
import sys
from typing import Optional

import torch

from .cli import ArgumentParser, fail

PROG = "kop-generate"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Sample text from a kop-triton checkpoint.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. runs/NAME/best)")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--rosa", default=None, choices=("exact", "reference"),
                   help="override how a ROSA model computes ROSA")
    p.add_argument("--rosa-window", type=int, default=None,
                   help="ROSA models: restart the automata every N tokens (default: never, whole history)")
    return p


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                  rosa_window: Optional[int] = None) -> str:
    """Prompt + continuation as text."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens; give at least one character")
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = {} if rosa_window is None else {"rosa_window": rosa_window}
    out = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen, **kw)
    return tokenizer.decode(out[0].tolist())


def main(argv: Optional[list] = None) -> int:
    from .checkpoint import CheckpointError, load_checkpoint
    from .distributed import resolve_device

    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if not (args.temperature >= 0 and math.isfinite(args.temperature)):
            raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
        if args.rosa_window is not None and args.rosa_window < 1:
            raise ValueError(f"--rosa-window must be >= 1, got {args.rosa_window}")
        if args.top_k is not None and args.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
        if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
        device = resolve_device(args.device)
        model, tokenizer = load_checkpoint(args.checkpoint, map_location=device)
        if args.rosa is not None:
            model.set_rosa(args.rosa)
        if args.rosa_window is not None and model.config.rosa == "off":
            raise ValueError("--rosa-window: this model has ROSA off")
        text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                             args.top_k, args.top_p, args.seed, rosa_window=args.rosa_window)
    except (CheckpointError, ValueError) as exc:
        return fail(PROG, exc)
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    return 0

