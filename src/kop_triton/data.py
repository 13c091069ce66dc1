"""Datasets, train/validation splits, tokenizer building and the resumable batch sampler.

Where text comes from, in order:

1. ``data_path``: a file (Tiny Shakespeare, ``--text``) or a directory holding
   ``train.txt``/``valid.txt``/``test.txt`` (WikiText-2), given on the command line;
2. ``data_dir`` (``--data-dir``, else the ``KOP_DATA_DIR`` environment variable, else
   ``~/.cache/kop_triton/data``) with the layout ``tinyshakespeare/input.txt`` and
   ``wikitext-2/{train,valid,test}.txt``;
3. a download of a missing file from the dataset's canonical public address into ``data_dir``.

Splits: Tiny Shakespeare and ``--text`` files are split by characters, validation = the last
``val_frac`` of the text (split index ``int(len(text) * (1 - val_frac))``); WikiText-2 uses its
standard train/valid/test files.

The batch sampler draws window offsets from a generator seeded by ``(seed, step)`` only, so the
batch of any step is known without replaying earlier steps (resume = remember the step), and the
global batch does not depend on the number of processes (rank r trains on its slice of it).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


class DataError(RuntimeError):
    """A dataset, data path or tokenizer problem the user can fix (reported as one line)."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    subdir: str
    files: dict  # split name -> file name inside subdir
    urls: dict   # file name -> canonical public address


DATASETS = {
    "tinyshakespeare": DatasetSpec(
        name="tinyshakespeare",
        subdir="tinyshakespeare",
        files={"all": "input.txt"},
        urls={"input.txt": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"},
    ),
    "wikitext2": DatasetSpec(
        name="wikitext2",
        subdir="wikitext-2",
        files={"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
        urls={f: "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/" + f
              for f in ("train.txt", "valid.txt", "test.txt")},
    ),
}
DATASET_ALIASES = {"shakespeare": "tinyshakespeare", "tiny-shakespeare": "tinyshakespeare",
                   "wikitext-2": "wikitext2", "wikitext": "wikitext2"}
TOKENIZERS = ("char", "byte", "sentencepiece")


def default_data_dir() -> Path:
    env = os.environ.get("KOP_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kop_triton" / "data"


def resolve_dataset(name: str) -> DatasetSpec:
    key = DATASET_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)} (or --text FILE)")
    return DATASETS[key]


def download(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically; a clear DataError when there is no network.  A failed
    download leaves nothing behind: no partial file, and no folder it created."""
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]   # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        Path(tmp).unlink(missing_ok=True)
        for d in created:
            with contextlib.suppress(OSError):   # only while empty: another process may be filling it
                d.rmdir()
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{dest.name} is not in {dest.parent} and downloading it from {url} failed ({reason}); "
                        f"put the file there, or point --data-dir / KOP_DATA_DIR at a directory that has it") from None
    return dest


def read_text(path, what: str, error: type = DataError) -> str:
    """The UTF-8 text of the file ``path``; ``error`` naming ``what`` (a flag or a dataset) when it is
    missing or not UTF-8 (every tool reads its text files through here)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory; give a UTF-8 text file")
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{what} file {path} cannot be read: {exc.strerror or exc}") from None


def split_text(text: str, val_frac: float) -> tuple[str, str]:
    """Last ``val_frac`` of the characters is validation: split at ``int(len(text) * (1 - val_frac))``."""
    if not isinstance(val_frac, float) and not isinstance(val_frac, int):
        raise TypeError(f"val_frac must be a float in (0, 1), got {val_frac!r}")
    if not 0.0 < val_frac < 1.0:
        raise DataError(f"--val-frac must be in (0, 1), got {val_frac}")
    if len(text) < 2:
        raise DataError(f"the text has {len(text)} characters; at least 2 are needed for a train/validation split")
    cut = min(max(int(len(text) * (1.0 - val_frac)), 1), len(text) - 1)
    return text[:cut], text[cut:]


@dataclass
class TextSplits:
    """Raw text of every split plus a description of where it came from."""
    train: str
    valid: str
    test: Optional[str]
    source: str
    train_path: Optional[Path] = None  # the file the train split came from (for tokenizer caching)


def load_text_splits(dataset: Optional[str] = None, *, text_file: Optional[str] = None,
                     data_path: Optional[str] = None, data_dir: Optional[str] = None,
                     val_frac: float = 0.1, allow_download: bool = True) -> TextSplits:
    """Read train/valid(/test) text for a named dataset or a plain text file (see module doc)."""
    if text_file is not None:
        path = Path(text_file).expanduser()
        train, valid = split_text(read_text(path, "--text"), val_frac)
        return TextSplits(train, valid, None, f"{path} (last {val_frac:g} is validation)", path)
    if dataset is None:
        raise DataError("give a dataset (--dataset tinyshakespeare|wikitext2) or a text file (--text FILE)")
    spec = resolve_dataset(dataset)
    if data_path is not None:
        base = Path(data_path).expanduser()
        if not base.exists():
            raise DataError(f"--data-path {base} does not exist")
        if spec.name == "tinyshakespeare":
            path = base / spec.files["all"] if base.is_dir() else base
            train, valid = split_text(read_text(path, "Tiny Shakespeare"), val_frac)
            return TextSplits(train, valid, None, f"{path} (last {val_frac:g} is validation)", path)
        if not base.is_dir():
            raise DataError(f"--data-path for wikitext2 must be a directory with train.txt, valid.txt, test.txt; "
                            f"got the file {base}")
        root = base
    else:
        root = Path(data_dir).expanduser() if data_dir else default_data_dir()
        root = root / spec.subdir

    paths = {}
    for split, fname in spec.files.items():
        path = root / fname
        if not path.is_file():
            if not allow_download:
                raise DataError(f"{path} not found (downloads disabled)")
            download(spec.urls[fname], path)
        paths[split] = path
    if spec.name == "tinyshakespeare":
        train, valid = split_text(read_text(paths["all"], "Tiny Shakespeare"), val_frac)
        return TextSplits(train, valid, None, f"{paths['all']} (last {val_frac:g} is validation)", paths["all"])
    return TextSplits(read_text(paths["train"], "WikiText-2 train"), read_text(paths["valid"], "WikiText-2 valid"),
                      read_text(paths["test"], "WikiText-2 test"), f"{root}/{{train,valid,test}}.txt",
                      paths["train"])


# ---------------------------------------------------------------------------------------- tokenizers

def sentencepiece_model_path(cache_dir: Path, train_text: str, vocab_size: int, model_type: str) -> Path:
    """Cache file name of a SentencePiece model: keyed by the train text's hash, vocab and type."""
    digest = hashlib.sha256(train_text.encode("utf-8")).hexdigest()[:16]
    return cache_dir / f"sp_{model_type}_{vocab_size}_{digest}.model"


def train_sentencepiece(train_text: str, model_path: Path, vocab_size: int, model_type: str = "unigram") -> Path:
    """Train a SentencePiece model on the train split only and write ``model_path`` atomically."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise DataError("--tokenizer sentencepiece needs the 'sentencepiece' package (pip install sentencepiece)") from None
    if not isinstance(vocab_size, int) or vocab_size < 8:
        raise DataError(f"--sp-vocab-size must be an integer >= 8, got {vocab_size!r}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".sp-train-") as tmp:
        src = Path(tmp) / "train.txt"
        src.write_text(train_text, encoding="utf-8")
        prefix = Path(tmp) / "sp"
        try:
            # unk only (no bos/eos/pad: a language model over a token stream does not need them);
            # full character coverage; the vocabulary may come out smaller on a small text.
            spm.SentencePieceTrainer.train(
                input=str(src), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
                character_coverage=1.0, hard_vocab_limit=False, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
                minloglevel=2, num_threads=max(1, min(8, os.cpu_count() or 1)),
                max_sentence_length=1 << 16)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"SentencePiece training failed: {str(exc).strip().splitlines()[-1]}") from None
        os.replace(str(prefix) + ".model", model_path)
    return model_path


def build_tokenizer(kind: str, splits: TextSplits, *, sp_vocab_size: int = 8192, sp_model_type: str = "unigram",
                    sp_model: Optional[str] = None, cache_dir: Optional[Path] = None):
    """Tokenizer for ``splits``: char (sorted characters of train + valid, as the reference), byte,
    or a SentencePiece model trained on the train split only and cached in ``cache_dir``."""
    from . import tokenizers as tk

    if kind == "char":
        return tk.CharTokenizer(splits.train + splits.valid + (splits.test or ""))
    if kind == "byte":
        return tk.ByteTokenizer()
    if kind == "sentencepiece":
        if sp_model is not None:
            path = Path(sp_model).expanduser()
            if not path.is_file():
                raise DataError(f"--sp-model {path} not found")
        else:
            if cache_dir is None:
                cache_dir = (splits.train_path.parent if splits.train_path is not None else default_data_dir()) \
                    / "tokenizers"
            path = sentencepiece_model_path(cache_dir, splits.train, sp_vocab_size, sp_model_type)
            fallback = sentencepiece_model_path(Path.home() / ".cache" / "kop_triton" / "tokenizers", splits.train,
                                                sp_vocab_size, sp_model_type)
            if not path.is_file() and fallback.is_file():
                path = fallback
            elif not path.is_file():
                try:
                    train_sentencepiece(splits.train, path, sp_vocab_size, sp_model_type)
                except OSError:  # the data directory is read-only: cache in the user's cache instead
                    path = train_sentencepiece(splits.train, fallback, sp_vocab_size, sp_model_type)
        return tk.SentencePieceTokenizer(str(path))
    raise DataError(f"unknown tokenizer {kind!r}; expected one of {list(TOKENIZERS)}")


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor."""
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


# ---------------------------------------------------------------------------------------- sampling

class BatchSampler:
    """Random windows of a token stream, a pure function of ``(seed, step)``.

    ``batch(step, rank, world)`` returns this rank's ``(x, y)`` of the global batch of ``step``:
    ``batch_size`` offsets drawn uniformly from ``[0, len(ids) - window - 1]`` by a generator seeded
    with ``(seed, step)``; rank ``r`` of ``world`` takes rows ``r * B/world : (r + 1) * B/world``.
    The position to resume from is the step number alone.

    With ``rosa`` "exact" or "reference" it returns ``(x, y, rosa_ids)``: the ROSA ids of every
    row of x (``kop_triton.rosa``, on the CPU, rows spread over threads), so the model needs
    no host work for them and the trainer can build the next batch while the model runs.
    """

    def __init__(self, ids: torch.Tensor, window: int, batch_size: int, seed: int, rosa: str = "off",
                 vocab_size: Optional[int] = None):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise TypeError(f"ids must be a 1-D tensor of token ids, got {type(ids).__name__}")
        if window < 1 or batch_size < 1:
            raise ValueError(f"window and batch_size must be >= 1, got window={window}, batch_size={batch_size}")
        if ids.numel() < window + 2:
            raise DataError(f"the training split has {ids.numel()} tokens; a window of {window} needs at least "
                            f"{window + 2} (use a smaller --window or more text)")
        from .ops._checks import check_int
        from .rosa import check_mode
        self.rosa = check_mode(rosa, allow_off=True)
        if self.rosa != "off":
            check_int(f"vocab_size (with rosa {rosa!r})", vocab_size, low=1)
        self.vocab_size = vocab_size
        self.ids = ids.to(torch.long).contiguous()
        self.window, self.batch_size, self.seed = int(window), int(batch_size), int(seed)
        self._arange = torch.arange(self.window + 1)

    def offsets(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step) * 7_919 + 1) % (2 ** 63 - 1))
        return torch.randint(0, self.ids.numel() - self.window - 1 + 1, (self.batch_size,), generator=g)

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by the world size {world}")
        per = self.batch_size // world
        offs = self.offsets(step)[rank * per:(rank + 1) * per]
        rows = self.ids[offs[:, None] + self._arange[None, :]]  # (per, window + 1)
        if self.rosa == "off":
            return rows[:, :-1], rows[:, 1:]
        from .rosa import rosa_next_ids
        x = rows[:, :-1].contiguous()
        return x, rows[:, 1:], rosa_next_ids(x, self.rosa, vocab_size=self.vocab_size)

    def state(self, step: int) -> dict:
        return {"kind": "random-windows", "seed": self.seed, "step": int(step), "window": self.window,
                "batch_size": self.batch_size, "tokens": int(self.ids.numel())}
