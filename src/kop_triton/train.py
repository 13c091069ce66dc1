"""Train a K-Stack language model: ``python -m kop_triton.train`` (console script ``kop-train``).

    python -m kop_triton.train --preset shakespeare-char-v2 --out runs/v2
    python -m kop_triton.train --dataset wikitext2 --tokenizer sentencepiece --sp-vocab-size 8192 ...
    python -m kop_triton.train --text notes.txt --val-frac 0.05 --tokenizer byte --steps 2000
    python -m kop_triton.train --out runs/v2 --resume          # continue the run in runs/v2
    python -m kop_triton.train --plot runs/v2                  # runs/v2/curves.png from its log.jsonl
    torchrun --nproc_per_node 4 -m kop_triton.train ...          # DDP (add --fsdp for FSDP2)
    torchrun --nproc_per_node 4 -m kop_triton.train --context-parallel 2 ...   # each window over 2 ranks, x 2 DP
    torchrun --nproc_per_node 4 -m kop_triton.train --context-parallel 2 --fsdp ...   # x 2 FSDP2 (hybrid)

Recipe (the reference's): AdamW with betas (0.8, 0.999); parameter groups -- decay/alpha/gate
logits, biases and norms at 0.5 x lr without weight decay, embeddings at 0.75 x lr without weight
decay, everything else with weight decay 0.02; linear warmup, then cosine down to ``--lr-floor``
(update ``s`` runs at ``lr * lr_factor(s)``, the reference's LambdaLR values step for step);
gradient-norm clip 1.0; a step whose loss or gradient norm is not finite is skipped and counted;
bf16 autocast on CUDA; optional ``torch.compile``.

Output directory (``--out``): ``last/`` and ``best/`` checkpoints (our model directory format,
with the optimiser state, RNG states and trainer state as extra files, ``checkpoint.py``),
``log.jsonl``, one JSON object per line for every evaluation (and every ``--log-interval``
training steps: loss, lr, gradient norm before clipping, tokens/s), the same scalars as
TensorBoard event files in ``tensorboard/`` (``--no-tensorboard``: none) and ``curves.png``,
redrawn at every evaluation (``curves.py``).  SIGINT/SIGTERM finish the current step, save
``last/`` and exit; ``--resume`` continues from it with model, optimiser, schedule, data position
and RNG restored, so the losses are those of an uninterrupted run.  On ``--resume`` the run's
settings come from its checkpoint: only the flags of ``RESUME_OVERRIDABLE`` may be given anew;
any other flag given with a value different from the run's is refused, naming it.

Reading order: ``train`` -> ``build_run`` (``prepare_args``, ``restore``) -> ``train_loop``
(``train_step``, ``evaluate_and_save``, ``save``).  A ``Run`` holds everything one run owns,
``Progress`` what the loop advances and a checkpoint restores.
"""
from __future__ import annotations

if __name__ == "__main__":   # python -m kop_triton.train: run as the console script does, before the slow
    import sys               # imports, so that a Ctrl-C even during them ends with one line, exit 130
    from kop_triton.cli import run_tool
    sys.exit(run_tool("kop-train", "kop_triton.train"))

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from . import curves as kcurves
from . import data as kdata
from . import distributed as kdist
from .checkpoint import (CheckpointError, atomic_write_files, check_destination, find_resume_dir, full_tensor,
                         load_checkpoint, load_optimizer_state, load_training_state, optimizer_state,
                         save_training_checkpoint)
from .cli import ArgumentParser, fail
from .eval import evaluate, perplexity
from .model import KStackConfig, KStackLM
from .presets import PRESETS, get_preset

PROG = "kop-train"
PROGRESS_LINE_EVERY_S = 30.0     # --no-progress: a progress line at most this often
LOGIT_NAMES = ("decay_logit", "alpha_logit", "gate_logit", "eta_logit", "rho_logit")

def _model_flags() -> dict:
    """The model flags, derived from KStackConfig (the one definition of the fields: names, types,
    defaults and help text, shared with the HF config): field -> (argparse type, help).  List fields
    take comma-separated values; ``shared_kernel`` (a bool) is --shared-kernel / --no-shared-kernel."""
    import typing
    hints = typing.get_type_hints(KStackConfig)
    flags = {}
    for f in dataclasses.fields(KStackConfig):
        if f.name in ("vocab_size", "shared_kernel"):     # vocab_size: from the tokenizer
            continue
        typ = hints[f.name]
        args_ = [a for a in typing.get_args(typ) if a is not type(None)]
        base = args_[0] if typing.get_origin(typ) is typing.Union and args_ else typ
        flags[f.name] = (str if typing.get_origin(base) in (list, tuple) else base, f.metadata["help"])
    return flags


# model flags: KStackConfig field -> (type, help); defaults come from KStackConfig itself
MODEL_FLAGS = _model_flags()
# flags that may differ between a run and its --resume (everything else comes from the checkpoint)
RESUME_OVERRIDABLE = ("steps", "eval_interval", "log_interval", "progress", "device", "compile", "amp", "threads",
                      "eval_batch_size", "data_path", "data_dir", "text", "fsdp", "tensorboard", "curves",
                      "context_parallel")


class UsageError(Exception):
    """A problem with flags, paths or state that the user can fix: reported as one line, exit status 2."""


class ConfigError(UsageError):
    """A flag value that the model, data or device code rejected while the run was set up (their
    ValueError / TypeError, re-raised by ``config_errors``)."""


@contextlib.contextmanager
def config_errors():
    """Set-up code runs inside: a ValueError / TypeError there is a rejected flag value, a
    ConfigError (one line); the same exceptions raised later, inside a step, stay bugs."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


# ------------------------------------------------------------------------------- flags

def _flag(group, suppress_default: bool, *names, **opts) -> None:
    if suppress_default:
        opts.pop("default", None)
    group.add_argument(*names, **opts)


def build_parser(suppress_defaults: bool = False) -> ArgumentParser:
    """The flags; with ``suppress_defaults`` a parser that returns only the flags given (parse_args)."""
    kw = {"argument_default": argparse.SUPPRESS} if suppress_defaults else {}
    p = ArgumentParser(prog=PROG, description="Train a K-Stack language model.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    def section(title):
        return functools.partial(_flag, p.add_argument_group(title), suppress_defaults)

    add = section("run")
    add("--preset", choices=sorted(PRESETS), default=None, help="ready configuration (flags given override it)")
    add("--out", default=None, help="output directory (default runs/<preset or dataset>-<tokenizer>)")
    add("--resume", action="store_true", default=False,
        help="continue the run in --out from last/, with its own settings (only --steps, --eval-interval, "
             "--log-interval, --device, --threads, --eval-batch-size, data locations and the speed flags may change)")
    add("--seed", type=int, default=42, help="seed of initialisation, data order and dropout")
    add("--steps", type=int, default=5000, help="optimiser steps in total")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    add("--compile", action="store_true", default=False, help="torch.compile the model for training")
    add("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add("--fsdp", action="store_true", default=False, help="under torchrun: FSDP2 instead of DDP")
    add("--context-parallel", type=int, default=1, metavar="W",
        help="under torchrun: split every training and evaluation window over W consecutive ranks (context "
             "parallelism, exact; kop_triton.context_parallel), data parallel (DDP, or FSDP2 with --fsdp: sharded "
             "over the WORLD_SIZE / W groups, replicated within a group) over the WORLD_SIZE / W groups")
    add("--progress", action=argparse.BooleanOptionalAction, default=True,
        help="tqdm progress bar (without it: a progress line with the ETA at most every 30 s)")
    add("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
        help="TensorBoard event files in OUT/tensorboard (train loss, lr, gradient norm, tokens/s; val CE / PPL): "
             "written by kop-train itself, no TensorBoard install needed to write them")
    add("--curves", action=argparse.BooleanOptionalAction, default=True,
        help="redraw OUT/curves.png (loss and perplexity curves) at every evaluation (needs matplotlib)")
    add("--plot", metavar="RUN_DIR", default=None,
        help="only draw RUN_DIR/curves.png from RUN_DIR/log.jsonl (any kop-train run) and exit")
    add("--log-interval", type=int, default=50, help="training-loss log record every N steps (0 = none)")
    add("--eval-interval", type=int, default=250, help="evaluate every N steps (and at the end)")
    add("--eval-batch-size", type=int, default=8, help="windows per evaluation batch")
    add("--eval-window", type=int, default=None, help="evaluation window (default: --window)")
    add("--max-eval-tokens", type=int, default=None,
        help="evaluate on the first N >= 1 validation tokens (default: all of them)")

    add = section("data")
    add("--dataset", default=None, help="tinyshakespeare or wikitext2 (default tinyshakespeare unless --text)")
    add("--text", default=None, help="train on this UTF-8 text file instead (last --val-frac is validation)")
    add("--val-frac", type=float, default=0.1, help="validation fraction for tinyshakespeare / --text")
    add("--data-path", default=None, help="local dataset file (tinyshakespeare) or directory (wikitext2)")
    add("--data-dir", default=None, help="data cache directory (default $KOP_DATA_DIR or ~/.cache/kop_triton/data)")
    add("--tokenizer", choices=kdata.TOKENIZERS, default="char", help="tokenizer")
    add("--sp-vocab-size", type=int, default=8192, help="SentencePiece vocabulary size")
    add("--sp-model-type", choices=("unigram", "bpe"), default="unigram", help="SentencePiece model type")
    add("--sp-model", default=None, help="use this SentencePiece .model instead of training one")

    add = section("model (KStackConfig fields; default: the KStackConfig default)")
    for field, (typ, help_) in MODEL_FLAGS.items():
        add("--" + field.replace("_", "-"), type=typ, default=None, help=help_)
    add("--shared-kernel", action=argparse.BooleanOptionalAction, default=None,
        help={f.name: f for f in dataclasses.fields(KStackConfig)}["shared_kernel"].metadata["help"])

    add = section("optimiser and schedule")
    add("--batch-size", type=int, default=32, help="global batch size (sequences per step over all ranks)")
    add("--lr", type=float, default=1e-2, help="peak learning rate")
    add("--lr-floor", type=float, default=1e-4, help="learning rate at the end of the cosine")
    add("--warmup-steps", type=int, default=3000, help="linear warmup steps")
    add("--beta1", type=float, default=0.8, help="AdamW beta1")
    add("--beta2", type=float, default=0.999, help="AdamW beta2")
    add("--weight-decay", type=float, default=0.02, help="weight decay of the core group")
    add("--optimizer-groups", choices=("grouped", "simple"), default="grouped",
        help="grouped: the reference's groups; simple: decay on >=2-D params only, one lr")
    add("--logit-lr-mult", type=float, default=0.5, help="lr multiplier of decay/alpha/gate logits")
    add("--bias-lr-mult", type=float, default=0.5, help="lr multiplier of biases")
    add("--norm-lr-mult", type=float, default=0.5, help="lr multiplier of norm scales")
    add("--emb-lr-mult", type=float, default=0.75, help="lr multiplier of embeddings")
    add("--clip-grad-norm", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    return p


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """Parse flags on top of the preset's defaults; records which flags were given explicitly."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    parser = build_parser()
    if explicit.get("preset"):
        parser.set_defaults(**get_preset(explicit["preset"]))
    args = parser.parse_args(argv)
    args.explicit = sorted(explicit)
    return args


def flag(name: str) -> str:
    """``d_model`` -> ``--d-model``."""
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------- optimiser and schedule

def _group_of(name: str, param: nn.Parameter, embedding_params: set) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in LOGIT_NAMES:
        return "logit"
    top = name.split(".", 1)[0]
    if id(param) in embedding_params or top.startswith("emb") or top.startswith("rosa_"):
        return "emb"
    if leaf == "bias":
        return "bias"
    if leaf == "scale" or "norm" in name:
        return "norm"
    return "core"


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.02, mode: str = "grouped",
                 logit_lr_mult: float = 0.5, bias_lr_mult: float = 0.5, norm_lr_mult: float = 0.5,
                 emb_lr_mult: float = 0.75) -> list:
    """AdamW parameter groups of the reference recipe.

    grouped: ``logit`` (decay/alpha/gate/eta logits), ``bias``, ``norm`` (RMSNorm scales) at their lr
    multipliers without weight decay; ``emb`` (embedding tables and the embedding projection) at
    ``emb_lr_mult`` without weight decay; ``core`` (everything else) with ``weight_decay``.
    simple: ``decay`` (parameters with >= 2 dims) with weight decay, ``no_decay`` without; one lr.
    Each group carries ``lr_mult`` (its lr is ``lr * lr_mult * schedule``) and a ``name``.
    Parameters shared between modules (the tied head) appear once.
    """
    if mode not in ("grouped", "simple"):
        raise ValueError(f"mode must be 'grouped' or 'simple', got {mode!r}")
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    mults = {"core": 1.0, "logit": logit_lr_mult, "bias": bias_lr_mult, "norm": norm_lr_mult, "emb": emb_lr_mult,
             "decay": 1.0, "no_decay": 1.0}
    decays = {"core": weight_decay, "decay": weight_decay}
    order = ("core", "logit", "bias", "norm", "emb") if mode == "grouped" else ("decay", "no_decay")
    buckets = {k: [] for k in order}
    for name, p in model.named_parameters():  # named_parameters yields a shared parameter once
        if not p.requires_grad:
            continue
        if mode == "grouped":
            buckets[_group_of(name, p, emb)].append(p)
        else:
            buckets["decay" if p.dim() >= 2 else "no_decay"].append(p)
    return [{"name": k, "params": ps, "lr": lr * mults[k], "lr_mult": mults[k],
             "weight_decay": decays.get(k, 0.0)} for k, ps in buckets.items() if ps]


def lr_factor(step: int, warmup_steps: int, total_steps: int, floor_ratio: float) -> float:
    """Schedule multiplier of update ``step`` (0-based): ``max(step, 1) / warmup`` during warmup, then a
    cosine from 1 to ``floor_ratio`` over the remaining steps (``floor_ratio`` after ``total_steps``).

    These are the reference trainer's values update for update: its LambdaLR sets the lr of its
    training step k (1-based) to ``lr * lr_lambda(k - 1)`` with ``lr_lambda(s) = max(s, 1) / warmup``
    in warmup, so its first two updates both run at ``lr / warmup`` and the peak comes at update
    ``warmup`` (benchmarks/recipe_check.py compares the two schedules at every step)."""
    if step < warmup_steps:
        return max(step, 1) / warmup_steps
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    t = min(max(t, 0.0), 1.0)
    return floor_ratio + (1.0 - floor_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0) * factor
    return base_lr * factor


def make_optimizer(model: nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, args.lr, args.weight_decay, args.optimizer_groups, args.logit_lr_mult,
                          args.bias_lr_mult, args.norm_lr_mult, args.emb_lr_mult)
    kwargs = {"lr": args.lr, "betas": (args.beta1, args.beta2)}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


# ------------------------------------------------------------------------------- logging

class JsonlLog:
    """Append-only JSON-lines log, written by rank 0 and flushed per record."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (left by a run killed after its last checkpoint)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if rec.get("step", 0) <= step:
                kept.append(line)
        atomic_write_files(self.path.parent, {self.path.name: ("\n".join(kept) + "\n" if kept else "").encode("utf-8")})

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()


def _say(info: kdist.DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


def format_duration(seconds: Optional[float]) -> str:
    """``3725`` -> ``1h02m``, ``754`` -> ``12m34s``, ``9.4`` -> ``9s``; None -> ``?``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class EtaClock:
    """This session's step and evaluation times: tokens/s and the time left of the run.

    ETA = mean training-step time x steps left + mean evaluation time x evaluations left (every
    ``eval_interval`` steps and at the end), both measured in this session (the evaluations are
    left out until one has run)."""

    def __init__(self, total: int, eval_interval: int, tokens_per_step: int):
        self.total, self.every, self.tokens_per_step = total, eval_interval, tokens_per_step
        self.train_s = self.eval_s = 0.0
        self.steps = self.evals = 0
        self.window_s, self.window_steps = 0.0, 0        # since the last log record
        self.ema_s: Optional[float] = None              # recent step time, for the bar

    def stepped(self, seconds: float) -> None:
        self.train_s += seconds
        self.steps += 1
        self.window_s += seconds
        self.window_steps += 1
        self.ema_s = seconds if self.ema_s is None else 0.9 * self.ema_s + 0.1 * seconds

    def evaluated(self, seconds: float) -> None:
        self.eval_s += seconds
        self.evals += 1

    def window_tokens_per_s(self) -> float:
        """Training tokens/s over the steps since the last call (evaluation time not counted)."""
        tps = self.window_steps * self.tokens_per_step / max(self.window_s, 1e-9)
        self.window_s, self.window_steps = 0.0, 0
        return tps

    def recent_tokens_per_s(self) -> float:
        return self.tokens_per_step / max(self.ema_s or 0.0, 1e-9)

    def evals_left(self, step: int) -> int:
        n = self.total // self.every - step // self.every
        return n + (1 if self.total % self.every and step < self.total else 0)

    def eta_s(self, step: int) -> Optional[float]:
        if not self.steps:
            return None
        eta = self.train_s / self.steps * max(self.total - step, 0)
        if self.evals:
            eta += self.eval_s / self.evals * self.evals_left(step)
        return eta


class ProgressBar:
    """The tqdm bar of rank 0 (none elsewhere or with ``--no-progress``): loss, lr, tokens/s and the
    ETA (``EtaClock``: evaluations included) every 10 steps.  Without a bar, rank 0 prints a
    progress line with the same numbers at most every ``line_every_s`` seconds (default
    ``PROGRESS_LINE_EVERY_S``).  ``say`` prints a line above the bar (or plainly without one)."""

    def __init__(self, enabled: bool, info: kdist.DistInfo, total: int, step: int, clock: EtaClock,
                 line_every_s: Optional[float] = None):
        self.info, self.clock = info, clock
        self.line_every_s = PROGRESS_LINE_EVERY_S if line_every_s is None else line_every_s
        fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
        self.bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr,
                        bar_format=fmt) if enabled and info.is_main else None
        self.t_line = time.perf_counter()

    def update(self, step: int, total: int, loss: float, lr: float) -> None:
        eta = format_duration(self.clock.eta_s(step))
        if self.bar is None:
            now = time.perf_counter()
            if self.info.is_main and (now - self.t_line >= self.line_every_s) and step < total:
                self.t_line = now
                _say(self.info, f"step {step}/{total}: loss {loss:.4f} lr {lr:.2e} "
                                f"{self.clock.recent_tokens_per_s():,.0f} tok/s | ETA {eta}")
            return
        self.bar.update(1)
        if step % 10 == 0 or step == total:
            self.bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{lr:.2e}",
                                  "tok_s": f"{self.clock.recent_tokens_per_s():,.0f}", "eta": eta}, refresh=False)

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            _say(self.info, msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------- RNG

def _rng_state(info: kdist.DistInfo) -> dict:
    """RNG states of every rank, as tensors: cpu (world, n) uint8, cuda (world, n) uint8 if on CUDA."""
    state = {"cpu": kdist.all_gather_bytes(torch.get_rng_state(), info)}
    if info.device.type == "cuda":
        cuda = torch.cuda.get_rng_state(info.device).to(info.device)
        state["cuda"] = kdist.all_gather_bytes(cuda, info).cpu()
    return state


def _restore_rng(state: dict, info: kdist.DistInfo, seed: int, step: int) -> None:
    cpu = state.get("cpu")
    if isinstance(cpu, torch.Tensor) and cpu.dim() == 2 and info.rank < cpu.shape[0]:
        torch.set_rng_state(cpu[info.rank].clone())
        cuda = state.get("cuda")
        if info.device.type == "cuda" and isinstance(cuda, torch.Tensor) and info.rank < cuda.shape[0]:
            torch.cuda.set_rng_state(cuda[info.rank].clone(), info.device)
    else:  # resumed on more ranks than the run had: a fresh, deterministic stream for this rank
        torch.manual_seed(_rank_seed(seed, info.rank) + 7_919 * step)


def _rank_seed(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + 17) % (2 ** 63 - 1)


# ------------------------------------------------------------------------------- model

def model_config(args, vocab_size: int) -> KStackConfig:
    """The KStackConfig the model flags describe (KStackConfig checks the values)."""
    kwargs = {"vocab_size": vocab_size}
    fields = {f.name for f in dataclasses.fields(KStackConfig)}
    for name in list(MODEL_FLAGS) + ["shared_kernel"]:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in fields:
            raise UsageError(f"{flag(name)} is not a KStackConfig field of this model version")
        if name == "adaptive_cutoffs" and isinstance(value, str):
            try:
                value = tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise UsageError(f"--adaptive-cutoffs must be comma-separated integers, got {value!r}") from None
        if name == "rosa_layers" and isinstance(value, str):
            try:
                value = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise UsageError(f"--rosa-layers must be comma-separated K2 layer indices, got {value!r}") from None
        kwargs[name] = value
    try:
        return KStackConfig(**kwargs)
    except (ValueError, TypeError) as exc:   # say the flag, not the config field: --d-model, not d_model
        raise ConfigError(re.sub(r"KStackConfig\.(\w+)", lambda m: flag(m.group(1)), str(exc))) from exc


# ------------------------------------------------------------------------------- evaluation

def run_eval(model: nn.Module, val_ids: torch.Tensor, window: int, batch_size: int, info: kdist.DistInfo,
             amp: bool, sharded_model: bool, cp=None) -> dict:
    """Validation CE/PPL with the protocol of kop_triton.eval (consecutive windows, zero states).

    Under DDP each rank scores a contiguous share of the windows and the sums are reduced; an
    FSDP-sharded model needs every rank in every forward, so there each rank scores them all.
    With context parallelism (``cp``, this rank's ContextParallel) the unit is a CP group: every window
    is split over the group's ranks (each scores its shard, the loss shares summed over the group), and
    the groups share the windows as the ranks do without CP."""
    n_windows = (val_ids.numel() - 1) // window
    if n_windows < 1:
        raise UsageError(f"the validation split has {val_ids.numel()} tokens, fewer than one evaluation window "
                         f"of {window} + 1; use a smaller --eval-window/--window or a larger --val-frac")
    cp_world = 1 if cp is None else cp.world
    dp_rank, dp_world = info.rank // cp_world, info.world // cp_world
    if cp is not None:
        from .context_parallel import ContextParallelEval
        model = ContextParallelEval(model, cp)     # the whole windows' loss on every rank of the group
    split = info.enabled and not sharded_model
    if split:
        lo = n_windows * dp_rank // dp_world
        hi = n_windows * (dp_rank + 1) // dp_world
        ids = val_ids[lo * window: hi * window + 1]
    else:
        ids = val_ids
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    totals = torch.zeros(2, dtype=torch.float64)
    if ids.numel() > window:
        with ctx:
            res = evaluate(model, ids.to(info.device), window=window, batch_size=batch_size)
        totals += torch.tensor([float(res["val_ce"]) * float(res["tokens"]), float(res["tokens"])],
                               dtype=torch.float64)
    if split:
        if cp is not None and cp.rank:          # the group's ranks hold the same sums: count them once
            totals.zero_()
        totals = kdist.all_reduce(totals, info)
    ce = float(totals[0] / totals[1])
    return {"val_ce": ce, "val_ppl": perplexity(ce), "val_tokens": int(totals[1])}


# ------------------------------------------------------------------------------- data

class BatchPrefetcher:
    """With ROSA on, builds the batch of step + 1 in a background thread while step's runs: the
    sampler runs the automata there (C code, outside the GIL), overlapping the model.  The sampler
    is a pure function of the step, so the batches are those of the plain loop.  With ROSA off a
    batch is one gather, loaded in place."""

    def __init__(self, sampler, info: kdist.DistInfo, pin: bool = False):
        self.sampler, self.info, self.pin = sampler, info, pin
        self.enabled = getattr(sampler, "rosa", "off") != "off"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch") if self.enabled else None
        self._next = None          # (step, future)

    def _load(self, step):
        batch = self.sampler.batch(step, self.info.rank, self.info.world)
        return tuple(t.pin_memory() for t in batch) if self.pin else batch

    def get(self, step: int, total_steps: int):
        if self._next is not None and self._next[0] == step:
            batch = self._next[1].result()
        else:
            batch = self._load(step)
        if self.enabled and step + 1 < total_steps:
            self._next = (step + 1, self._pool.submit(self._load, step + 1))
        return batch

    def close(self):
        self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------- signals

class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves and exits at the next step boundary.
    A second signal restores the default handler (a third one then kills at once)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:
            signal.signal(signum, signal.SIG_DFL)
        self.signum = signum

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)


# ------------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Progress:
    """What the loop advances and a checkpoint restores (trainer.json, with the sampler and args)."""
    step: int = 0
    best_val_ce: float = math.inf
    skipped_steps: int = 0
    tokens_seen: int = 0

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(step=int(state["step"]), best_val_ce=float(state.get("best_val_ce", math.inf)),
                   skipped_steps=int(state.get("skipped_steps", 0)), tokens_seen=int(state.get("tokens_seen", 0)))

    def best_ppl_text(self) -> str:
        return f"{perplexity(self.best_val_ce):.3f}" if math.isfinite(self.best_val_ce) else "n/a (no finite val_ce yet)"


@dataclasses.dataclass
class Resumed:
    """A training checkpoint read back for --resume (load_training_state)."""
    directory: Path
    trainer: dict
    optimizer: dict
    rng: dict


@dataclasses.dataclass
class Run:
    """Everything one training run owns, built by ``build_run``."""
    args: argparse.Namespace
    info: kdist.DistInfo
    out: Path
    model: KStackLM                 # the plain model (FSDP2 shards it in place)
    train_model: nn.Module          # what a training step calls: model, or its DDP / FSDP2 / compiled wrapper
    optimizer: torch.optim.Optimizer
    tokenizer: object
    sampler: kdata.BatchSampler
    val_ids: torch.Tensor
    eval_window: int
    amp: bool
    fsdp: bool
    log: JsonlLog
    progress: Progress
    cp: Optional[object] = None     # the rank's context_parallel.ContextParallel with --context-parallel W > 1
    tb: Optional[kcurves.TensorBoardWriter] = None   # rank 0 with --tensorboard, while the loop runs
    curves_failed: bool = False                        # curves.png could not be drawn: not tried again

    @property
    def device(self) -> torch.device:
        return self.info.device

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()


def _saved_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("explicit", "resume", "plot")}


def apply_saved_args(args, saved: dict) -> None:
    """--resume: take the run's settings from its checkpoint.  Flags of RESUME_OVERRIDABLE given now
    win; any other flag given with a value different from the run's is refused, naming it (it would
    otherwise be silently replaced by the saved value)."""
    fixed = [k for k in args.explicit if k not in RESUME_OVERRIDABLE and k not in ("resume", "out") and k in saved]
    changed = [k for k in fixed if getattr(args, k) != saved[k]]
    if changed:
        diffs = ", ".join(f"{flag(k)} {getattr(args, k)!r} (the run has {saved[k]!r})" for k in changed)
        raise UsageError(f"--resume continues the run in {args.out} with its own settings, but {diffs} "
                         f"differ from them; drop {'this flag' if len(changed) == 1 else 'these flags'} (on resume "
                         f"only {', '.join(flag(k) for k in RESUME_OVERRIDABLE)} may change), or start a new run "
                         f"with another --out")
    for key, value in saved.items():
        if key in ("resume", "explicit", "out") or (key in RESUME_OVERRIDABLE and key in args.explicit):
            continue
        setattr(args, key, value)


def check_args(args, info: kdist.DistInfo) -> None:
    positive = {"steps": args.steps, "batch_size": args.batch_size, "eval_interval": args.eval_interval,
                "eval_batch_size": args.eval_batch_size}
    for k, v in positive.items():
        if v is None or v < 1:
            raise UsageError(f"{flag(k)} must be >= 1, got {v}")
    for k in ("warmup_steps", "log_interval"):
        if getattr(args, k) < 0:
            raise UsageError(f"{flag(k)} must be >= 0, got {getattr(args, k)}")
    if not (args.clip_grad_norm >= 0 and math.isfinite(args.clip_grad_norm)):
        raise UsageError(f"--clip-grad-norm must be a finite number >= 0 (0 = no clipping), got {args.clip_grad_norm}")
    if not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    for k in ("beta1", "beta2"):
        if not 0.0 <= getattr(args, k) < 1.0:
            raise UsageError(f"{flag(k)} must be in [0, 1), got {getattr(args, k)}")
    for k in ("weight_decay", "logit_lr_mult", "bias_lr_mult", "norm_lr_mult", "emb_lr_mult"):
        if not (getattr(args, k) >= 0 and math.isfinite(getattr(args, k))):
            raise UsageError(f"{flag(k)} must be a finite number >= 0, got {getattr(args, k)}")
    if not args.lr > 0 or args.lr_floor < 0 or args.lr_floor > args.lr:
        raise UsageError(f"need 0 <= --lr-floor <= --lr and --lr > 0, got lr={args.lr}, lr_floor={args.lr_floor}")
    if args.max_eval_tokens is not None and args.max_eval_tokens < 1:
        raise UsageError(f"--max-eval-tokens must be >= 1, got {args.max_eval_tokens} (leave it out to evaluate "
                         f"on every validation token)")
    if args.eval_window is not None and args.eval_window < 1:
        raise UsageError(f"--eval-window must be >= 1, got {args.eval_window}")
    if args.fsdp and "fsdp" in args.explicit and not info.enabled:
        raise UsageError("--fsdp shards the model over the processes of a torchrun launch, but this is a single "
                         "process (WORLD_SIZE is not > 1); run it as torchrun --nproc_per_node N -m kop_triton.train "
                         "... --fsdp, or drop --fsdp")
    check_context_parallel(args, info)
    dp_world = info.world // _cp_size(args)
    if args.batch_size % dp_world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes {info.world}"
                         + (f" / --context-parallel {_cp_size(args)} = {dp_world}" if _cp_size(args) > 1 else ""))


def _cp_size(args) -> int:
    return int(getattr(args, "context_parallel", 1) or 1)


def check_context_parallel(args, info: kdist.DistInfo) -> None:
    """--context-parallel W: W >= 1 dividing the number of processes."""
    w = getattr(args, "context_parallel", 1)
    if not isinstance(w, int) or w < 1:
        raise UsageError(f"--context-parallel must be an int >= 1, got {w!r}")
    if w == 1:
        return
    if info.world % w:
        raise UsageError(f"--context-parallel {w} must divide the number of processes {info.world} (run it under "
                         f"torchrun --nproc_per_node N with N a multiple of {w}, or pass --context-parallel 1; on "
                         f"--resume it may change)")


def prepare_args(args, info: kdist.DistInfo) -> Optional[Resumed]:
    """Fill the dataset / --out defaults, on --resume replace the flags by the saved run's, check
    them all; returns the checkpoint to resume from (None for a new run)."""
    if args.dataset is None and args.text is None:
        args.dataset = "tinyshakespeare"
    if args.dataset is not None and args.text is not None:
        raise UsageError("give either --dataset or --text, not both")
    if args.out is None:
        tag = args.preset or (Path(args.text).stem if args.text else args.dataset)
        args.out = str(Path("runs") / f"{tag}-{args.tokenizer}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; --out names the run's directory (choose another path)")
    resumed = None
    if args.resume:
        directory = find_resume_dir(out)
        resumed = Resumed(directory, *load_training_state(directory))
        apply_saved_args(args, resumed.trainer.get("args", {}))
    else:   # a new run: only into a new or empty directory (never mixed into a model folder or another run)
        check_destination(out, "--out", "run", replace_flag="--resume to continue it")
    check_args(args, info)
    return resumed


def _read_splits(args) -> kdata.TextSplits:
    return kdata.load_text_splits(args.dataset, text_file=args.text, data_path=args.data_path,
                                  data_dir=args.data_dir, val_frac=args.val_frac)


def load_data(args, info: kdist.DistInfo, tokenizer=None):
    """(splits, tokenizer, train ids, validation ids); the tokenizer is built unless given (resume).
    Under torchrun rank 0 downloads and trains a SentencePiece model first, the others then read."""
    if info.enabled:
        splits = _read_splits(args) if info.is_main else None
        kdist.barrier(info)
        splits = splits or _read_splits(args)
    else:
        splits = _read_splits(args)
    sp = dict(sp_vocab_size=args.sp_vocab_size, sp_model_type=args.sp_model_type)
    if tokenizer is None and args.tokenizer == "sentencepiece" and args.sp_model is None and info.enabled:
        if info.is_main:  # trains (and caches) the model; the others read the cache after the barrier
            tokenizer = kdata.build_tokenizer(args.tokenizer, splits, **sp)
        kdist.barrier(info)
    if tokenizer is None:
        tokenizer = kdata.build_tokenizer(args.tokenizer, splits, **sp, sp_model=args.sp_model)
    return splits, tokenizer, kdata.encode(tokenizer, splits.train), kdata.encode(tokenizer, splits.valid)


def build_run(args, info: kdist.DistInfo) -> Run:
    """A new run from the flags, or the run in --out restored from its checkpoint (--resume)."""
    resumed = prepare_args(args, info)
    torch.manual_seed(args.seed)  # same initialisation on every rank
    with config_errors():
        model, tokenizer = load_checkpoint(resumed.directory) if resumed else (None, None)
        splits, tokenizer, train_ids, val_ids = load_data(args, info, tokenizer)
        if model is None:
            if (args.tokenizer == "sentencepiece" and args.sp_model is None
                    and tokenizer.vocab_size < args.sp_vocab_size):
                _say(info, f"{PROG}: note: SentencePiece found only {tokenizer.vocab_size:,} pieces in the training "
                           f"text, fewer than --sp-vocab-size {args.sp_vocab_size:,}; the model's vocabulary is "
                           f"{tokenizer.vocab_size:,} (more text gives more pieces)")
            model = KStackLM(model_config(args, tokenizer.vocab_size))
        sampler = kdata.BatchSampler(train_ids, int(model.config.window), args.batch_size, args.seed,
                                     rosa=model.config.rosa, vocab_size=model.config.vocab_size)
    if args.max_eval_tokens is not None:
        val_ids = val_ids[: args.max_eval_tokens + 1]
    model.to(info.device)
    fsdp = bool(args.fsdp and info.enabled)
    train_model, cp = model, None
    if _cp_size(args) > 1:
        # CP groups of consecutive ranks.  DDP wraps the CP wrapper and averages over every rank (CP x DP);
        # FSDP2 shards the model hybridly on the (cp, dp) mesh: sharded over dp, replicated over cp, the
        # gradients averaged over every rank as well (reduce-scatter over dp, all-reduce over cp)
        from . import context_parallel as kcp
        with config_errors():
            for what, n in (("--window", int(model.config.window)), ("--eval-window", args.eval_window)):
                if n is not None and n < _cp_size(args):
                    raise ValueError(f"{what} {n} is shorter than --context-parallel {_cp_size(args)}: every rank "
                                     f"needs at least one token of every window")
            if fsdp:
                mesh = kdist.cp_dp_mesh(info, _cp_size(args))
                cp = kcp.ContextParallel(mesh.get_group("cp"))
                train_model = kcp.ContextParallelLM(kdist.wrap(model, info, fsdp=True, mesh=mesh), cp)
            else:
                cp = kcp.make_groups(_cp_size(args))
                train_model = kdist.wrap(kcp.ContextParallelLM(model, cp), info)
        sampler = kcp.GroupBatches(sampler, _cp_size(args))
    else:
        train_model = kdist.wrap(train_model, info, fsdp=fsdp)  # FSDP2 shards ``model`` in place
    optimizer = make_optimizer(model, args, info.device)
    if args.compile:
        train_model = torch.compile(train_model)
    out = Path(args.out)
    run = Run(args=args, info=info, out=out, model=model, train_model=train_model, optimizer=optimizer,
              tokenizer=tokenizer, sampler=sampler, val_ids=val_ids,
              eval_window=int(args.eval_window or model.config.window),
              amp=bool(args.amp) and info.device.type == "cuda", fsdp=fsdp, cp=cp,
              log=JsonlLog(out / "log.jsonl", info.is_main), progress=Progress())
    if resumed is not None:
        restore(run, resumed)
    else:
        torch.manual_seed(_rank_seed(args.seed, info.rank))  # dropout stream of this rank
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    _log_start(run, splits, train_ids, resumed is not None)
    return run


def restore(run: Run, resumed: Resumed) -> None:
    """--resume: optimiser state, progress counters and RNG streams from the checkpoint."""
    try:
        load_optimizer_state(run.model, run.optimizer, resumed.optimizer)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{resumed.directory}: optimizer state does not fit the model ({exc})") from None
    run.progress = Progress.from_state(resumed.trainer)
    _restore_rng(resumed.rng, run.info, run.args.seed, run.progress.step)


def _log_start(run: Run, splits, train_ids: torch.Tensor, resumed: bool) -> None:
    n_params = sum(p.numel() for p in run.model.parameters())
    vocab = run.tokenizer.vocab_size
    if resumed:
        run.log.truncate_after(run.progress.step)
        _say(run.info, f"{PROG}: resuming {run.out} at step {run.progress.step}/{run.args.steps}")
    else:
        run.log.write(event="start", step=0, params=n_params, vocab_size=vocab, world_size=run.info.world,
                      train_tokens=int(train_ids.numel()), val_tokens=int(run.val_ids.numel()), data=splits.source,
                      config=dataclasses.asdict(run.model.config), args=_saved_args(run.args))
    _say(run.info, f"{PROG}: {n_params:,} parameters | vocab {vocab} | train {train_ids.numel():,} / "
                   f"val {run.val_ids.numel():,} tokens | {run.info.world} process(es) on {run.device} | out {run.out}")


def train_step(run: Run, batch) -> tuple:
    """One optimiser step at ``run.progress.step`` on ``batch``: schedule, forward, backward, clip,
    update; a step whose loss or gradient norm is not finite is skipped and counted.
    -> (loss, lr, gradient norm before clipping; None when the loss was not finite)."""
    args, info, p = run.args, run.info, run.progress
    lr = set_lr(run.optimizer, args.lr, lr_factor(p.step, args.warmup_steps, args.steps, args.lr_floor / args.lr))
    x, y = batch[0].to(run.device, non_blocking=True), batch[1].to(run.device, non_blocking=True)
    extra = {} if len(batch) == 2 else {"rosa_ids": batch[2].to(run.device, non_blocking=True)}
    run.train_model.train()
    with run.autocast():
        loss = run.train_model(x, y, **extra)
    loss_value = float((kdist.all_reduce(loss.detach().float().reshape(1).cpu(), info) / info.world).item())
    run.optimizer.zero_grad(set_to_none=True)
    stepped, gnorm = False, None
    if math.isfinite(loss_value):
        loss.backward()
        kdist.sync_replicated_grads(run.model, info)
        # --clip-grad-norm 0: the norm is still measured (logged, and a non-finite one skips the step)
        gnorm = kdist.clip_grad_norm(run.model.parameters(),
                                     args.clip_grad_norm if args.clip_grad_norm > 0 else math.inf, info)
        if math.isfinite(gnorm):
            run.optimizer.step()
            stepped = True
        run.optimizer.zero_grad(set_to_none=True)
    p.skipped_steps += not stepped
    p.step += 1
    p.tokens_seen += args.batch_size * int(run.model.config.window)
    return loss_value, lr, gnorm


def save(run: Run, which: str) -> None:
    """Write ``out/<which>`` (last or best): weights, optimiser and RNG states, progress.  Every rank
    takes part (the RNG states and an FSDP2 model are gathered)."""
    rng = _rng_state(run.info)
    opt = optimizer_state(run.model, run.optimizer)
    plain = run.model
    if run.fsdp:  # gather the full weights into an unsharded copy
        full = {k: full_tensor(v) for k, v in run.model.state_dict().items()}
        if run.info.is_main:
            plain = KStackLM(run.model.config)
            plain.load_state_dict(full)
    if run.info.is_main:
        state = dict(dataclasses.asdict(run.progress), world_size=run.info.world,
                     sampler=run.sampler.state(run.progress.step), args=_saved_args(run.args))
        save_training_checkpoint(run.out / which, plain, run.tokenizer, opt, rng, state)
    kdist.barrier(run.info)


def record(run: Run, **rec) -> None:
    """One log.jsonl record, and its scalars in the TensorBoard file (``curves.tensorboard_scalars``)."""
    run.log.write(**rec)
    if run.tb is not None:
        run.tb.scalars(rec["step"], kcurves.tensorboard_scalars(rec))


def draw_curves(run: Run, bar: ProgressBar) -> None:
    """Redraw ``out/curves.png`` (rank 0, --curves); a failure to draw is said once and drawing stops,
    training goes on."""
    if not (run.args.curves and run.info.is_main) or run.curves_failed:
        return
    try:
        kcurves.plot_run(run.out)
    except Exception as exc:  # noqa: BLE001 - a picture must never end a training run
        why = "matplotlib is not installed (pip install matplotlib)" if isinstance(exc, ImportError) else \
            f"{type(exc).__name__}: {exc}"
        bar.say(f"{PROG}: note: {run.out / 'curves.png'} not drawn: {why}; training goes on without it "
                f"(--no-curves silences this)")
        run.curves_failed = True


def evaluate_and_save(run: Run, loss: float, lr: float, elapsed: float, bar: ProgressBar,
                      clock: Optional[EtaClock] = None) -> None:
    """Score the validation split, log and print it, save ``best/`` when it improved and ``last/``,
    redraw the curves."""
    p = run.progress
    res = run_eval(run.model, run.val_ids, run.eval_window, run.args.eval_batch_size, run.info, run.amp,
                   sharded_model=run.fsdp, cp=run.cp)
    if run.fsdp:
        kdist.reshard(run.model)
    improved = res["val_ce"] < p.best_val_ce
    p.best_val_ce = min(p.best_val_ce, res["val_ce"])
    record(run, event="eval", step=p.step, train_loss=loss, lr=lr, skipped_steps=p.skipped_steps,
           tokens_seen=p.tokens_seen, elapsed_s=round(elapsed, 3), best_val_ppl=perplexity(p.best_val_ce), **res)
    eta = "" if clock is None or p.step >= run.args.steps else f" | ETA {format_duration(clock.eta_s(p.step))}"
    bar.say(f"step {p.step}/{run.args.steps}: val_ce {res['val_ce']:.4f} val_ppl {res['val_ppl']:.3f} "
            f"(best {p.best_ppl_text()}) train_loss {loss:.4f}{eta}")
    if improved:
        save(run, "best")
    save(run, "last")
    draw_curves(run, bar)


def train_loop(run: Run, stop: StopFlag) -> int:
    """Steps until --steps (evaluating every --eval-interval and at the end) or a signal; -> exit code."""
    args, p = run.args, run.progress
    if p.step >= args.steps:
        _say(run.info, f"{PROG}: the run in {run.out} is already at step {p.step} of --steps {args.steps}: nothing to "
                       f"train (pass a larger --steps to continue it); best val_ppl {p.best_ppl_text()}")
        return 0
    clock = EtaClock(args.steps, args.eval_interval, args.batch_size * int(run.model.config.window))
    bar = ProgressBar(args.progress, run.info, args.steps, p.step, clock)
    if args.tensorboard and run.info.is_main:
        # a resumed session hides, in TensorBoard, what a killed one logged past the checkpoint
        run.tb = kcurves.TensorBoardWriter(run.out / "tensorboard", purge_step=p.step + 1 if p.step else None)
    prefetch = BatchPrefetcher(run.sampler, run.info, pin=run.device.type == "cuda")
    t_start, stop_signum = time.perf_counter(), 0
    try:
        while p.step < args.steps:
            # every rank stops at the same step, whichever of them got the signal
            stop_signum = int(kdist.all_reduce(torch.tensor([float(stop.signum)]), run.info, op="max").item())
            if stop_signum:
                break
            t0 = time.perf_counter()
            loss, lr, gnorm = train_step(run, prefetch.get(p.step, args.steps))
            clock.stepped(time.perf_counter() - t0)
            if args.log_interval and p.step % args.log_interval == 0:
                record(run, event="train", step=p.step, loss=loss, lr=lr, grad_norm=gnorm,
                       tokens_per_s=round(clock.window_tokens_per_s(), 1), skipped_steps=p.skipped_steps)
            bar.update(p.step, args.steps, loss, lr)
            if p.step % args.eval_interval == 0 or p.step == args.steps:
                t0 = time.perf_counter()
                evaluate_and_save(run, loss, lr, time.perf_counter() - t_start, bar, clock)
                clock.evaluated(time.perf_counter() - t0)
    finally:
        prefetch.close()
        if run.tb is not None:
            run.tb.close()
    if p.step < args.steps:  # stopped by a signal
        save(run, "last")
        signum = stop_signum or stop.signum or signal.SIGTERM
        _say(run.info, f"{PROG}: stopped by {signal.Signals(signum).name} at step {p.step}; checkpoint saved to "
                       f"{run.out / 'last'} (continue with --resume --out {run.out})")
        bar.close()
        return 128 + signum
    bar.close()
    wall = time.perf_counter() - t_start
    run.log.write(event="done", step=p.step, skipped_steps=p.skipped_steps,
                  best_val_ppl=perplexity(p.best_val_ce) if math.isfinite(p.best_val_ce) else None,
                  wall_s=round(wall, 3))
    _say(run.info, f"{PROG}: done, {p.step} steps ({p.skipped_steps} skipped), best val_ppl {p.best_ppl_text()}, "
                   f"{wall:.1f}s this session; checkpoints in {run.out}")
    return 0


def train(args) -> int:
    """Run (or resume) training as described by ``args`` (see build_parser). Returns the exit code."""
    stop = StopFlag().install()  # before anything slow, so an early signal is not lost
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        with config_errors():
            info = kdist.init(args.device)
        try:
            return train_loop(build_run(args, info), stop)
        finally:
            kdist.shutdown()
    finally:
        stop.restore()


def plot_only(args) -> int:
    """``--plot RUN_DIR``: draw RUN_DIR/curves.png and exit."""
    others = [k for k in args.explicit if k != "plot"]
    if others:
        raise UsageError(f"--plot only draws the curves of an existing run and trains nothing; drop "
                         f"{', '.join(flag(k) for k in others)}")
    try:
        path = kcurves.plot_run(args.plot)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    print(path)
    return 0


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    try:
        if args.plot is not None:
            return plot_only(args)
        return train(args)
    except (UsageError, kdata.DataError, CheckpointError) as exc:
        return fail(PROG, exc)
    except OSError as exc:   # e.g. an --out that cannot be created or written
        return fail(PROG, f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")

