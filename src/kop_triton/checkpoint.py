"""Checkpoints: a directory with ``config.json`` and ``model.safetensors``.

config.json holds everything needed to rebuild the model and its tokenizer::

    {"format": "kop-triton-checkpoint", "version": 1,
     "model": {KStackConfig fields}, "tokenizer": {tokenizer.to_config()},
     "weights": {"file": "model.safetensors", "sha256": "..."}, "extra_files": [...], "meta": {...}}

Loading never unpickles anything: JSON plus safetensors only.  The weights' SHA-256 is checked,
then names, shapes and dtypes against a freshly built model; any mismatch raises
``CheckpointError`` and leaves the caller with nothing half-loaded.  Writes are atomic: every file
is first written completely to a temporary file in the target directory (fsync'ed), and only
when all of them are written are they renamed over the old ones; a failure before that leaves
the directory as it was.

Training checkpoints (kop-train's ``last/`` and ``best/``) are model checkpoints plus
``optimizer.pt`` (the optimiser state keyed by parameter names, unsharded: loadable by any world
size), ``rng.pt`` (every rank's RNG states) and ``trainer.json`` (step, counters, sampler, flags and
the two files' SHA-256), written last: ``save_training_checkpoint`` / ``load_training_state``.
The two ``.pt`` files hold tensors only and are read with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

from .model import KStackConfig, KStackLM
from .tokenizers import tokenizer_from_config

FORMAT = "kop-triton-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# a training checkpoint (kop-train's last/ and best/) is a model checkpoint plus these extra files
TRAINER_FORMAT = "kop-train/1"
TRAINER_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


class CheckpointError(Exception):
    """A checkpoint directory that is missing, corrupted or does not match its config."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_temp(directory: Path, name: str, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)          # mkstemp creates 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_files(directory, files: Dict[str, bytes]) -> None:
    """Write every ``name -> bytes`` into ``directory``: all temp files first, then the renames."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temps = []
    try:
        for name, data in files.items():
            temps.append((_write_temp(directory, name, data), directory / name))
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, dst in temps:
        os.replace(tmp, dst)
    try:  # make the renames durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - directories cannot be fsync'ed on every platform
        pass


def _state_dict_bytes(model: KStackLM) -> bytes:
    from safetensors.torch import save
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save(sd, metadata={"format": "pt"})


def save_checkpoint(directory, model: KStackLM, tokenizer, extra: Optional[Dict[str, bytes]] = None,
                    meta: Optional[dict] = None) -> Path:
    """Write ``model`` (a KStackLM) and ``tokenizer`` to ``directory`` atomically.

    ``extra``: optional ``{file name: bytes}`` written atomically alongside (e.g. an optimizer
    state); names must be plain file names other than config.json / model.safetensors.
    ``meta``: optional JSON-serialisable dict stored in config.json (step, metrics, ...).
    """
    if not isinstance(model, KStackLM):
        raise TypeError(f"model must be a KStackLM, got {type(model).__name__}")
    if not hasattr(tokenizer, "to_config") or not hasattr(tokenizer, "vocab_size"):
        raise TypeError(f"tokenizer must be a kop_triton tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's "
                         f"vocab_size {model.config.vocab_size}")
    extra = dict(extra or {})
    for name, data in extra.items():
        if (not isinstance(name, str) or not name or name in (CONFIG_FILE, WEIGHTS_FILE) or "/" in name
                or "\\" in name or name.startswith(".")):
            raise ValueError(f"extra file name must be a plain file name other than {CONFIG_FILE} and "
                             f"{WEIGHTS_FILE}, got {name!r}")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"extra[{name!r}] must be bytes, got {type(data).__name__}")
    weights = _state_dict_bytes(model)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config.to_dict(),
        "tokenizer": tokenizer.to_config(),
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(weights)},
        "extra_files": {name: _sha256(bytes(data)) for name, data in extra.items()},
        "meta": meta or {},
    }
    cfg_bytes = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    files = {name: bytes(data) for name, data in extra.items()}
    files[WEIGHTS_FILE] = weights
    files[CONFIG_FILE] = cfg_bytes          # renamed last
    atomic_write_files(directory, files)
    return Path(directory)


def read_config(directory) -> dict:
    """Parse and check config.json of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    path = directory / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (not a kop-triton checkpoint directory)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupted: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} config")
    if cfg.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {cfg.get('version')!r}; this code reads {VERSION}")
    for key in ("model", "tokenizer", "weights"):
        if not isinstance(cfg.get(key), dict):
            raise CheckpointError(f"{path} lacks the '{key}' section")
    return cfg


def load_checkpoint(directory, map_location="cpu"):
    """Load ``(model, tokenizer)`` from a checkpoint directory; the model is in eval mode.

    Raises CheckpointError on a missing/corrupted file, a checksum mismatch, missing or
    unexpected tensors, or tensors whose shape/dtype do not match the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    directory = Path(directory)
    cfg = read_config(directory)
    try:
        config = KStackConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad model config: {e}") from None
    try:
        tokenizer = tokenizer_from_config(cfg["tokenizer"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad tokenizer config: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's {config.vocab_size}")
    wpath = directory / WEIGHTS_FILE
    try:
        data = wpath.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{wpath} is missing") from None
    want = cfg["weights"].get("sha256")
    if want is not None and _sha256(data) != want:
        raise CheckpointError(f"{wpath} is corrupted or truncated: its SHA-256 does not match config.json")
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wpath} is not a readable safetensors file: {e}") from None
    model = KStackLM(config)
    check_state_dict(model, state, source=str(wpath))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), tokenizer


def check_state_dict(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise CheckpointError unless ``state`` has exactly the model's names and shapes (float tensors)."""
    ref = model.state_dict()
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k in sorted(set(ref) & set(state)):
        t = state[k]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref[k].shape):
            problems.append(f"{k}: expected shape {tuple(ref[k].shape)}, got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        elif not t.is_floating_point():
            problems.append(f"{k}: expected a floating tensor, got {t.dtype}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(problems))


# ------------------------------------------------------------------------------- training checkpoints

def full_tensor(t):
    """A plain CPU tensor of ``t``; an FSDP2 DTensor shard is gathered first (a collective)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu() if isinstance(t, torch.Tensor) else t


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser state keyed by parameter names (not positions), unsharded, on CPU: loadable by
    any world size. Under FSDP2 every rank must call this (it gathers the shards)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    state = {order[i]: {k: full_tensor(v) for k, v in per.items()} for i, per in sorted(sd["state"].items())}
    return {"state": state,
            "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in sd["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
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


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load_bytes(b: bytes, what: str, directory: Path):
    try:
        return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a corrupt checkpoint
        raise CheckpointError(f"{directory}: {what} cannot be read ({type(exc).__name__}: {exc})") from None


def save_training_checkpoint(directory, model: KStackLM, tokenizer, optimizer_state: dict, rng_state: dict,
                             trainer_state: dict) -> None:
    """Write a model checkpoint plus optimiser state, RNG states and ``trainer_state`` (JSON) into
    ``directory``, replacing any previous one atomically: everything goes to ``<dir>.tmp`` first,
    which is then swapped in by renames (``find_resume_dir`` recovers from a kill between them)."""
    directory = Path(directory)
    opt_b, rng_b = _torch_bytes(optimizer_state), _torch_bytes(rng_state)
    state = dict(trainer_state, format=TRAINER_FORMAT,
                 sha256={OPTIMIZER_FILE: _sha256(opt_b), RNG_FILE: _sha256(rng_b)})
    state_b = json.dumps(state, indent=1).encode("utf-8")
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, tokenizer, extra={OPTIMIZER_FILE: opt_b, RNG_FILE: rng_b},
                    meta={"step": trainer_state.get("step"), "best_val_ce": trainer_state.get("best_val_ce")})
    atomic_write_files(tmp, {TRAINER_FILE: state_b})  # written last: its presence marks a complete checkpoint
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def find_resume_dir(out) -> Path:
    """``out/last``; if a save was interrupted between its renames, the complete one of last.tmp/last.old."""
    out = Path(out)
    last = out / "last"
    if last.exists():
        return last
    for cand in (out / "last.tmp", out / "last.old"):
        if (cand / TRAINER_FILE).is_file():
            return cand
    raise CheckpointError(f"--resume: no checkpoint in {out} (expected {last})")


def load_training_state(directory) -> tuple:
    """(trainer_state, optimizer_state, rng_state) of a training checkpoint, every file verified."""
    directory = Path(directory)
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
