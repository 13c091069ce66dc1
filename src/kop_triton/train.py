"""Train a K-Stack language model: ``python -m kop_triton.train`` (console script ``kop-train``).

    python -m kop_triton.train --preset shakespeare-char-v2 --out runs/v2
    python -m kop_triton.train --dataset wikitext2 --tokenizer sentencepiece --sp-vocab-size 8192 ...
    python -m kop_triton.train --text notes.txt --val-frac 0.05 --tokenizer byte --steps 2000
    python -m kop_triton.train --out runs/v2 --resume          # continue the run in runs/v2
    torchrun --nproc_per_node 4 -m kop_triton.train ...          # DDP (add --fsdp for FSDP2)

Recipe (the reference's): AdamW with betas (0.8, 0.999); parameter groups -- decay/alpha/gate
logits, biases and norms at 0.5 x lr without weight decay, embeddings at 0.75 x lr without weight
decay, everything else with weight decay 0.02; linear warmup, then cosine down to ``--lr-floor``;
gradient-norm clip 1.0; a step whose loss or gradient norm is not finite is skipped and counted;
bf16 autocast on CUDA; optional ``torch.compile``.

Output directory (``--out``): ``last/`` and ``best/`` checkpoints (our model directory format,
with the optimiser state, RNG states and trainer state as extra files) and ``log.jsonl``, one
JSON object per line for every evaluation (and every ``--log-interval`` training steps).
SIGINT/SIGTERM finish the current step, save ``last/`` and exit; ``--resume`` continues from it
with model, optimiser, schedule, data position and RNG restored, so the losses are those of an
uninterrupted run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import data as kdata
from . import distributed as kdist
from .presets import PRESETS, get_preset

PROG = "kop-train"
TRAINER_FORMAT = "kop-train/1"
TRAINER_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
LOGIT_NAMES = ("decay_logit", "alpha_logit", "gate_logit", "eta_logit", "rho_logit")

# model flags: KStackConfig field -> (type, help); defaults come from KStackConfig itself
MODEL_FLAGS = {
    "d_model": (int, "model width D"),
    "emb_dim": (int, "embedding width E (default: d_model)"),
    "n_k2": (int, "number of K2 blocks"),
    "rank": (int, "rank R of each K2 mixer (key channels)"),
    "kernel_size": (int, "taps of the causal Kbase kernel"),
    "gamma_min": (float, "lower end of the decay range"),
    "gamma_max": (float, "upper end of the decay range"),
    "alpha_cap": (float, "upper bound of the query scale alpha"),
    "head": (str, "output head: linear (tied), gelu or adaptive"),
    "head_mult": (int, "width multiplier of the gelu head"),
    "adaptive_cutoffs": (str, "comma-separated cutoffs of the adaptive head, e.g. 1024,4096"),
    "adaptive_div_value": (float, "adaptive head: width divisor per cluster"),
    "rosa": (str, "ROSA branch: off, exact (the definition) or reference (the reference implementation's "
                  "automaton, as its released ROSA checkpoints)"),
    "rosa_layers": (str, "0-based K2 layers that get ROSA, comma-separated (default: all)"),
    "emb_dropout": (float, "dropout after the embedding"),
    "mlp_dropout": (float, "dropout inside the MLPs"),
    "residual_dropout": (float, "dropout on the K2 mixer output"),
    "refine_steps": (int, "equilibrium refinement steps (paper option; 0 = off)"),
    "backend": (str, "op backend: auto, triton, chunked, recurrent, naive"),
    "window": (int, "training / evaluation context length T"),
}
# flags that may differ between a run and its --resume (everything else comes from the checkpoint)
RESUME_OVERRIDABLE = ("steps", "eval_interval", "log_interval", "progress", "device", "compile", "amp", "threads",
                      "eval_batch_size", "data_path", "data_dir", "text")


class UsageError(Exception):
    """A problem with flags, paths or state that the user can fix: reported as one line."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(suppress_defaults: bool = False) -> ArgumentParser:
    kw = {"argument_default": argparse.SUPPRESS} if suppress_defaults else {}
    p = ArgumentParser(prog=PROG, description="Train a K-Stack language model.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    groups = [p]

    def section(title):
        groups.append(p.add_argument_group(title))

    def add(*names, **opts):
        if suppress_defaults:
            opts.pop("default", None)
        groups[-1].add_argument(*names, **opts)

    section("run")
    add("--preset", choices=sorted(PRESETS), default=None, help="ready configuration (flags given override it)")
    add("--out", default=None, help="output directory (default runs/<preset or dataset>-<tokenizer>)")
    add("--resume", action="store_true", default=False, help="continue the run in --out from last/")
    add("--seed", type=int, default=42, help="seed of initialisation, data order and dropout")
    add("--steps", type=int, default=5000, help="optimiser steps in total")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    add("--compile", action="store_true", default=False, help="torch.compile the model for training")
    add("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add("--fsdp", action="store_true", default=False, help="under torchrun: FSDP2 instead of DDP")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    add("--log-interval", type=int, default=50, help="training-loss log record every N steps (0 = none)")
    add("--eval-interval", type=int, default=250, help="evaluate every N steps (and at the end)")
    add("--eval-batch-size", type=int, default=8, help="windows per evaluation batch")
    add("--eval-window", type=int, default=None, help="evaluation window (default: --window)")
    add("--max-eval-tokens", type=int, default=None, help="evaluate on at most this many validation tokens")

    section("data")
    add("--dataset", default=None, help="tinyshakespeare or wikitext2 (default tinyshakespeare unless --text)")
    add("--text", default=None, help="train on this UTF-8 text file instead (last --val-frac is validation)")
    add("--val-frac", type=float, default=0.1, help="validation fraction for tinyshakespeare / --text")
    add("--data-path", default=None, help="local dataset file (tinyshakespeare) or directory (wikitext2)")
    add("--data-dir", default=None, help="data cache directory (default $KOP_DATA_DIR or ~/.cache/kop_triton/data)")
    add("--tokenizer", choices=kdata.TOKENIZERS, default="char", help="tokenizer")
    add("--sp-vocab-size", type=int, default=8192, help="SentencePiece vocabulary size")
    add("--sp-model-type", choices=("unigram", "bpe"), default="unigram", help="SentencePiece model type")
    add("--sp-model", default=None, help="use this SentencePiece .model instead of training one")

    section("model (KStackConfig fields; default: the KStackConfig default)")
    for field, (typ, help_) in MODEL_FLAGS.items():
        add("--" + field.replace("_", "-"), type=typ, default=None, help=help_)
    add("--shared-kernel", action=argparse.BooleanOptionalAction, default=None,
        help="one Kbase kernel shared by all K2 blocks")

    section("optimiser and schedule")
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
    """Schedule multiplier of update ``step`` (0-based): ``(step+1)/warmup`` during warmup, then a cosine
    from 1 to ``floor_ratio`` over the remaining steps (``floor_ratio`` after ``total_steps``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
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


def _full(t):
    """A plain CPU tensor of ``t``; an FSDP2 DTensor shard is gathered first (a collective)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu() if isinstance(t, torch.Tensor) else t


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser state keyed by parameter names (not positions), unsharded, on CPU: loadable by
    any world size. Under FSDP2 every rank must call this (it gathers the shards)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    state = {order[i]: {k: _full(v) for k, v in per.items()} for i, per in sorted(sd["state"].items())}
    return {"state": state,
            "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in sd["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of optimizer_state (re-sharding for FSDP2 parameters); a ValueError when the names
    or groups do not fit this model."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = {names[id(p)]: i for i, p in enumerate(params)}
    try:
        groups = [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]
        per_param = {index[n]: dict(v) for n, v in state["state"].items()}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"parameter {exc} of the saved optimiser state is not in this model") from None
    for i, per in per_param.items():
        p = params[i]
        if hasattr(p, "device_mesh"):  # FSDP2 parameter: shard the full state like the parameter
            from torch.distributed.tensor import distribute_tensor
            for k, v in per.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                    per[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


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
        _atomic_write(self.path, ("\n".join(kept) + "\n" if kept else "").encode("utf-8"))

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()


def _atomic_write(path: Path, payload: bytes) -> None:
    from .checkpoint import atomic_write_files
    atomic_write_files(path.parent, {path.name: payload})


def _say(info: kdist.DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- checkpoints

def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load_bytes(b: bytes, what: str, directory: Path):
    from .checkpoint import CheckpointError
    try:
        return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a corrupt checkpoint
        raise CheckpointError(f"{directory}: {what} cannot be read ({type(exc).__name__}: {exc})") from None


def save_training_checkpoint(directory: Path, model: nn.Module, tokenizer, optimizer_state: dict,
                             rng_state: dict, trainer_state: dict) -> None:
    """Write a complete checkpoint into ``directory`` replacing any previous one atomically:
    everything goes to ``<dir>.tmp`` first, which is then swapped in by renames."""
    from .checkpoint import save_checkpoint

    opt_b, rng_b = _torch_bytes(optimizer_state), _torch_bytes(rng_state)
    state = dict(trainer_state, format=TRAINER_FORMAT,
                 sha256={OPTIMIZER_FILE: _sha256(opt_b), RNG_FILE: _sha256(rng_b)})
    state_b = json.dumps(state, indent=1).encode("utf-8")
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(str(tmp), model, tokenizer, extra={OPTIMIZER_FILE: opt_b, RNG_FILE: rng_b},
                    meta={"step": trainer_state.get("step"), "best_val_ce": trainer_state.get("best_val_ce")})
    _atomic_write(tmp / TRAINER_FILE, state_b)  # written last: its presence marks a complete checkpoint
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def find_resume_dir(out: Path) -> Path:
    """``out/last``; if a save was interrupted between its renames, the complete one of last.tmp/last.old."""
    last = out / "last"
    if last.exists():
        return last
    for cand in (out / "last.tmp", out / "last.old"):
        if (cand / TRAINER_FILE).is_file():
            return cand
    raise UsageError(f"--resume: no checkpoint in {out} (expected {last})")


def load_training_state(directory: Path) -> tuple:
    """(trainer_state, optimizer_state, rng_state) of a checkpoint, every file verified."""
    from .checkpoint import CheckpointError

    try:
        state = json.loads((directory / TRAINER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: {TRAINER_FILE} is missing (not a training checkpoint, or an "
                              f"interrupted save)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory}: {TRAINER_FILE} is corrupt ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"{directory}: {TRAINER_FILE} is not a {TRAINER_FORMAT} trainer state")
    out = []
    for name in (OPTIMIZER_FILE, RNG_FILE):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        b = path.read_bytes()
        if _sha256(b) != state.get("sha256", {}).get(name):
            raise CheckpointError(f"{directory}: {name} does not match its checksum (corrupt checkpoint)")
        out.append(_torch_load_bytes(b, name, directory))
    return state, out[0], out[1]


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

def model_config(args, vocab_size: int):
    from .model import KStackConfig

    kwargs = {"vocab_size": vocab_size}
    fields = {f.name for f in dataclasses.fields(KStackConfig)}
    for name in list(MODEL_FLAGS) + ["shared_kernel"]:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in fields:
            raise UsageError(f"--{name.replace('_', '-')} is not a KStackConfig field of this model version")
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
    return KStackConfig(**kwargs)


# ------------------------------------------------------------------------------- evaluation

def run_eval(model: nn.Module, val_ids: torch.Tensor, window: int, batch_size: int, info: kdist.DistInfo,
             amp: bool, sharded_model: bool) -> dict:
    """Validation CE/PPL with the protocol of kop_triton.eval (consecutive windows, zero states).

    Under DDP each rank scores a contiguous share of the windows and the sums are reduced; an
    FSDP-sharded model needs every rank in every forward, so there each rank scores them all."""
    from .eval import evaluate

    n_windows = (val_ids.numel() - 1) // window
    if n_windows < 1:
        raise UsageError(f"the validation split has {val_ids.numel()} tokens, fewer than one evaluation window "
                         f"of {window} + 1; use a smaller --eval-window/--window or a larger --val-frac")
    if info.enabled and not sharded_model:
        lo = n_windows * info.rank // info.world
        hi = n_windows * (info.rank + 1) // info.world
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
    if info.enabled and not sharded_model:
        totals = kdist.all_reduce(totals, info)
    ce = float(totals[0] / totals[1])
    return {"val_ce": ce, "val_ppl": math.exp(min(ce, 50.0)), "val_tokens": int(totals[1])}


# ------------------------------------------------------------------------------- data

class BatchPrefetcher:
    """With ROSA on, builds the batch of step + 1 in a background thread while step's runs: the
    sampler runs the automata there (C code, outside the GIL), overlapping the model.  The sampler
    is a pure function of the step, so the batches are those of the plain loop.  With ROSA off a
    batch is one gather, loaded in place."""

    def __init__(self, sampler, info: kdist.DistInfo, pin: bool = False):
        from concurrent.futures import ThreadPoolExecutor
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


# ------------------------------------------------------------------------------- training

def _load_data(args, info: kdist.DistInfo, tokenizer=None):
    def load():
        return kdata.load_text_splits(args.dataset, text_file=args.text, data_path=args.data_path,
                                      data_dir=args.data_dir, val_frac=args.val_frac)

    if info.enabled:  # rank 0 downloads what is missing; the others read after it
        splits = load() if info.is_main else None
        kdist.barrier(info)
        splits = splits or load()
    else:
        splits = load()
    if tokenizer is None:
        if args.tokenizer == "sentencepiece" and args.sp_model is None and info.enabled:
            # rank 0 trains (and caches) the SentencePiece model; the others then read the cache
            if info.is_main:
                tokenizer = kdata.build_tokenizer(args.tokenizer, splits, sp_vocab_size=args.sp_vocab_size,
                                                  sp_model_type=args.sp_model_type)
            kdist.barrier(info)
        if tokenizer is None:
            tokenizer = kdata.build_tokenizer(args.tokenizer, splits, sp_vocab_size=args.sp_vocab_size,
                                              sp_model_type=args.sp_model_type, sp_model=args.sp_model)
    train_ids, val_ids = kdata.encode(tokenizer, splits.train), kdata.encode(tokenizer, splits.valid)
    return splits, tokenizer, train_ids, val_ids


def _resolve_run_args(args) -> tuple:
    """Fill dataset/out defaults; on --resume replace the flags by the saved run's (see RESUME_OVERRIDABLE)."""
    if args.dataset is None and args.text is None:
        args.dataset = "tinyshakespeare"
    if args.dataset is not None and args.text is not None:
        raise UsageError("give either --dataset or --text, not both")
    if args.out is None:
        tag = args.preset or (Path(args.text).stem if args.text else args.dataset)
        args.out = str(Path("runs") / f"{tag}-{args.tokenizer}")
    out = Path(args.out)
    resume_dir = None
    if args.resume:
        resume_dir = find_resume_dir(out)
        state, _, _ = load_training_state(resume_dir)
        saved = state.get("args", {})
        for key, value in saved.items():
            if key in ("resume", "explicit", "out"):
                continue
            if key in RESUME_OVERRIDABLE and key in args.explicit:
                continue
            setattr(args, key, value)
    elif (out / "last").exists() or (out / "last.tmp").exists():
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return out, resume_dir


def _check_args(args) -> None:
    positive = {"steps": args.steps, "batch_size": args.batch_size, "eval_interval": args.eval_interval,
                "eval_batch_size": args.eval_batch_size}
    for k, v in positive.items():
        if v is None or v < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    if args.warmup_steps < 0 or args.log_interval < 0:
        raise UsageError("--warmup-steps and --log-interval must be >= 0")
    if not args.lr > 0 or args.lr_floor < 0 or args.lr_floor > args.lr:
        raise UsageError(f"need 0 <= --lr-floor <= --lr and --lr > 0, got lr={args.lr}, lr_floor={args.lr_floor}")


def train(args) -> int:
    """Run (or resume) training as described by ``args`` (see build_parser). Returns the exit code."""
    stop = StopFlag().install()  # before anything slow, so an early signal is not lost
    if args.threads is not None:
        if args.threads < 1:
            stop.restore()
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    info = kdist.init(args.device)
    try:
        return _train(args, info, stop)
    finally:
        stop.restore()
        kdist.shutdown()


def _train(args, info: kdist.DistInfo, stop: StopFlag) -> int:
    from .checkpoint import load_checkpoint
    from .model import KStackLM

    out, resume_dir = _resolve_run_args(args)
    _check_args(args)
    if args.batch_size % info.world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes {info.world}")
    device = info.device
    amp = bool(args.amp) and device.type == "cuda"

    torch.manual_seed(args.seed)  # same initialisation on every rank
    if resume_dir is not None:
        trainer_state, opt_state, rng_state = load_training_state(resume_dir)
        model, tokenizer = load_checkpoint(str(resume_dir), map_location="cpu")
    else:
        trainer_state = opt_state = rng_state = None
        tokenizer = None
    splits, tokenizer, train_ids, val_ids = _load_data(args, info, tokenizer)
    if resume_dir is None:
        cfg = model_config(args, tokenizer.vocab_size)
        model = KStackLM(cfg)
    window = int(model.config.window)
    eval_window = int(args.eval_window or window)
    if args.max_eval_tokens:
        val_ids = val_ids[: args.max_eval_tokens + 1]
    sampler = kdata.BatchSampler(train_ids, window, args.batch_size, args.seed, rosa=model.config.rosa,
                                 vocab_size=model.config.vocab_size)

    model.to(device)
    core = model
    fsdp = bool(args.fsdp and info.enabled)
    train_model = kdist.wrap(model, info, fsdp=fsdp)  # FSDP2 shards ``core`` in place
    optimizer = make_optimizer(core, args, device)
    if args.compile:
        train_model = torch.compile(train_model)

    step, best_ce, skipped, tokens_seen = 0, float("inf"), 0, 0
    if resume_dir is not None:
        try:
            load_optimizer_state(core, optimizer, opt_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            from .checkpoint import CheckpointError
            raise CheckpointError(f"{resume_dir}: optimizer state does not fit the model ({exc})") from None
        step = int(trainer_state["step"])
        best_ce = float(trainer_state.get("best_val_ce", float("inf")))
        skipped = int(trainer_state.get("skipped_steps", 0))
        tokens_seen = int(trainer_state.get("tokens_seen", 0))
        _restore_rng(rng_state, info, args.seed, step)
    else:
        torch.manual_seed(_rank_seed(args.seed, info.rank))  # dropout stream of this rank
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / "log.jsonl", info.is_main)
    n_params = sum(p.numel() for p in core.parameters())
    if resume_dir is not None:
        log.truncate_after(step)
        _say(info, f"{PROG}: resuming {out} at step {step}/{args.steps}")
    else:
        log.write(event="start", step=0, params=n_params, vocab_size=tokenizer.vocab_size, world_size=info.world,
                  train_tokens=int(train_ids.numel()), val_tokens=int(val_ids.numel()), data=splits.source,
                  config=dataclasses.asdict(core.config), args=_saved_args(args))
    _say(info, f"{PROG}: {n_params:,} parameters | vocab {tokenizer.vocab_size} | train {train_ids.numel():,} / "
               f"val {val_ids.numel():,} tokens | {info.world} process(es) on {device} | out {out}")

    def checkpoint(which: str) -> None:
        rng = _rng_state(info)  # collectives: every rank takes part
        opt = optimizer_state(core, optimizer)
        plain = core
        if fsdp:  # gather the full weights into an unsharded copy
            full = {k: _full(v) for k, v in core.state_dict().items()}
            if info.is_main:
                plain = KStackLM(core.config)
                plain.load_state_dict(full)
        if info.is_main:
            state = {"step": step, "best_val_ce": best_ce, "skipped_steps": skipped, "tokens_seen": tokens_seen,
                     "world_size": info.world, "sampler": sampler.state(step), "args": _saved_args(args)}
            save_training_checkpoint(out / which, plain, tokenizer, opt, rng, state)
        kdist.barrier(info)

    floor_ratio = args.lr_floor / args.lr
    local_bs = args.batch_size // info.world
    bar = None
    if args.progress and info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
    t_last, tok_last, last_loss, exit_code = time.perf_counter(), tokens_seen, float("nan"), 0
    t_start = time.perf_counter()
    stop_signum = 0
    prefetch = BatchPrefetcher(sampler, info, pin=device.type == "cuda")
    while step < args.steps:
        # every rank stops at the same step, whichever of them got the signal
        stop_signum = int(kdist.all_reduce(torch.tensor([float(stop.signum)]), info, op="max").item())
        if stop_signum:
            break
        lr = set_lr(optimizer, args.lr, lr_factor(step, args.warmup_steps, args.steps, floor_ratio))
        batch = prefetch.get(step, args.steps)
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        extra = {} if len(batch) == 2 else {"rosa_ids": batch[2].to(device, non_blocking=True)}
        train_model.train()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            loss = train_model(x, y, **extra)
        gl = kdist.all_reduce(loss.detach().float().reshape(1).cpu(), info) / info.world  # global mean
        loss_value = float(gl.item())
        optimizer.zero_grad(set_to_none=True)
        if math.isfinite(loss_value):
            loss.backward()
            kdist.sync_replicated_grads(core, info)
            if args.clip_grad_norm > 0:
                gnorm = kdist.clip_grad_norm(core.parameters(), args.clip_grad_norm, info)
            else:
                gnorm = 0.0
            if math.isfinite(gnorm):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
        else:
            skipped += 1
        step += 1
        tokens_seen += local_bs * window * info.world
        last_loss = loss_value
        if args.log_interval and step % args.log_interval == 0:
            log.write(event="train", step=step, loss=loss_value, lr=lr, skipped_steps=skipped)
        if bar is not None:
            now = time.perf_counter()
            bar.update(1)
            if step % 10 == 0 or step == args.steps:
                tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                t_last, tok_last = now, tokens_seen
        if step % args.eval_interval == 0 or step == args.steps:
            elapsed = time.perf_counter() - t_start
            res = run_eval(core, val_ids, eval_window, args.eval_batch_size, info, amp, sharded_model=fsdp)
            if fsdp:
                kdist.reshard(core)
            improved = res["val_ce"] < best_ce
            best_ce = min(best_ce, res["val_ce"])
            log.write(event="eval", step=step, train_loss=loss_value, lr=lr, skipped_steps=skipped,
                      tokens_seen=tokens_seen, elapsed_s=round(elapsed, 3),
                      best_val_ppl=math.exp(min(best_ce, 50.0)), **res)
            msg = (f"step {step}: val_ce {res['val_ce']:.4f} val_ppl {res['val_ppl']:.3f} "
                   f"(best {math.exp(min(best_ce, 50.0)):.3f}) train_loss {loss_value:.4f}")
            if bar is not None:
                bar.write(msg, file=sys.stderr)
            else:
                _say(info, msg)
            if improved:
                checkpoint("best")
            checkpoint("last")
    prefetch.close()
    if step < args.steps:  # stopped by a signal
        checkpoint("last")
        signum = stop_signum or stop.signum or signal.SIGTERM
        _say(info, f"{PROG}: stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to "
                   f"{out / 'last'} (continue with --resume --out {out})")
        exit_code = 128 + signum
    if bar is not None:
        bar.close()
    if exit_code == 0:
        wall = time.perf_counter() - t_start
        log.write(event="done", step=step, skipped_steps=skipped, best_val_ppl=math.exp(min(best_ce, 50.0)),
                  wall_s=round(wall, 3))
        _say(info, f"{PROG}: done, {step} steps ({skipped} skipped), best val_ppl {math.exp(min(best_ce, 50.0)):.3f}, "
                   f"{wall:.1f}s this session; checkpoints in {out}")
    del last_loss
    return exit_code


def _saved_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("explicit", "resume")}


def main(argv: Optional[list] = None) -> int:
    from .checkpoint import CheckpointError

    args = parse_args(argv)
    try:
        code = train(args)
    except (UsageError, kdata.DataError, CheckpointError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # e.g. a model configuration KStackConfig rejects
        if not _is_config_error(exc):
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return code


def _is_config_error(exc: Exception) -> bool:
    """A ValueError/TypeError raised while validating arguments (not a bug deep inside a step)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return any(name.endswith(s) for s in ("model.py", "modules.py", "_checks.py", "tokenizers.py", "data.py",
                                          "distributed.py", "train.py"))


if __name__ == "__main__":
    sys.exit(main())
