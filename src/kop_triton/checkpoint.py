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

import contextlib
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


# ------------------------------------------------------------------------------- destinations

_KIND_NAMES = {"kop": "a kop-triton checkpoint", "hf": "a transformers (HF) model directory",
               "run": "a kop-train run"}


def directory_kind(path) -> str:
    """What ``path`` holds: "missing", "file", "empty", "kop" (a kop-triton checkpoint: its
    config.json says so), "hf" (a transformers directory of a kstack model), "run" (a kop-train
    run: log.jsonl or last/), or "other" (anything else, e.g. a lone model.safetensors)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    names = {p.name for p in path.iterdir()}
    if not names:
        return "empty"
    if names & {"last", "last.tmp", "last.old", "log.jsonl"}:
        return "run"
    if CONFIG_FILE in names:
        try:
            cfg = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return "other"
        if isinstance(cfg, dict) and cfg.get("format") == FORMAT:
            return "kop"
        if isinstance(cfg, dict) and cfg.get("model_type") == "kstack":
            return "hf"
    return "other"


def check_destination(path, flag: str, writes: str, overwrite: bool = False, replace_flag: str = "--overwrite") -> None:
    """Refuse to write ``writes`` ("kop", "hf" or "run") into ``path`` (named by ``flag`` in the
    message) unless it is missing or empty, or holds the same kind and ``overwrite`` says to
    replace it.  A directory holding anything else is never written into: nothing a command did not
    create is overwritten or mixed with its output."""
    kind = directory_kind(path)
    what = _KIND_NAMES[writes]
    if kind in ("missing", "empty"):
        return
    if kind == "file":
        raise CheckpointError(f"{flag} {path} is a file; it must name a directory (a new or empty one)")
    if kind == writes:
        if overwrite:
            return
        raise CheckpointError(f"{flag} {path} already holds {what}; pass {replace_flag} to replace it, or choose "
                              f"another directory")
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir())
    held = _KIND_NAMES.get(kind, "files this command did not write")
    raise CheckpointError(f"{flag} {path} holds {held} ({', '.join(names[:6])}{' ...' if len(names) > 6 else ''}); "
                          f"it would be mixed with or overwrite them, so nothing was written: choose a new or "
                          f"empty directory")


@contextlib.contextmanager
def staged_directory(directory):
    """Write a whole directory atomically: yields a fresh sibling temp directory to fill; on success
    it replaces ``directory`` (renames only: the old one is moved aside, then removed), on any
    error or interrupt it is deleted and ``directory`` is left byte-identical."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)          # mkdtemp makes 0700; give the usual directory mode
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, old / "d")
        os.replace(tmp, directory)
    except BaseException:
        if old is not None and (old / "d").exists() and not directory.exists():
            os.replace(old / "d", directory)          # put the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}: every id the model can produce needs a token (and every token an "
                         f"id); save it with the tokenizer it was trained with")
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
    if directory.is_file():
        if directory.suffix in (".pt", ".pth", ".bin"):
            why = (f"a torch file (a reference K-language-model checkpoint? convert it first: kop-convert "
                   f"{directory} OUT_DIR --tokenizer ... , then pass OUT_DIR)")
        elif directory.name in (CONFIG_FILE, WEIGHTS_FILE):
            why = f"a file of a checkpoint: pass its directory, {str(directory.parent)!r}"
        else:
            why = "a file"
        raise CheckpointError(f"checkpoint {str(directory)!r} is {why}; a checkpoint is a directory with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
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
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{directory / CONFIG_FILE}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"model's vocab_size is {config.vocab_size} (ids without text, or text without ids): "
                              f"the config was edited or written by other code")
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
