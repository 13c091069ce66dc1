"""The bad-input trial (issue 22): every case a user can get wrong, run and classified.

Each case is one bad (or borderline) input to an API function or a command-line tool, with what
a user should get: a clear error (an exception of a documented type, or a CLI's one line
``PROG: error: ...`` with exit status 2, whose message names the argument or flag) or correct
handling (a check on the result).  What it actually did is classified as

- ``clear``: the expected kind of error, its message holding every keyword of the case;
- ``correct``: handled, and the case's check of the result passed;
- ``unclear``: an error of the right kind whose message misses a keyword (or a CLI error that is
  not one line);
- ``crash``: a traceback (any other exception type, or an exception escaping a CLI's ``main``), or
  a child process killed by a signal (a segmentation fault);
- ``silent``: no error where one was due, or a wrong result.

Cases that name ``keep`` take the SHA-256 of every file under those paths before the call and
check them after: a failing command must leave them byte-identical (``lost`` otherwise).

``tests/test_bad_inputs.py`` runs every case (each must be clear or correct);
``python tests/bad_inputs.py`` prints the table by area (the closing note's table).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 8
TINY = ["--d-model", "16", "--n-k2", "1", "--rank", "2", "--kernel-size", "4", "--window", "16",
        "--batch-size", "2", "--steps", "1", "--eval-interval", "1", "--backend", "chunked",
        "--no-progress", "--no-tensorboard", "--no-curves", "--threads", "1"]


# ------------------------------------------------------------------------------------ outcomes

@dataclass
class Cli:
    """What a tool's ``main(argv)`` did: exit status and its output."""
    rc: int
    out: str
    err: str


@dataclass
class Child:
    """What a child process did: exit status (negative: killed by that signal) and its output."""
    rc: int
    out: str
    err: str


@dataclass
class Case:
    area: str
    name: str
    run: Callable[["Env"], object]
    keywords: Sequence[str] = ()      # an error is expected: these must all appear in its message
    check: Optional[Callable] = None  # correct handling is expected: check(result) must pass
    errors: Tuple[type, ...] = (ValueError, TypeError)
    keep: Callable[["Env"], Sequence[Path]] = lambda env: ()
    origin: str = "new"               # "issue": listed in issue 22; "new": added by this trial
    cli_rc: int = 2
    slow: bool = False


def _sha_tree(paths) -> dict:
    out = {}
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def classify(case: Case, env: "Env") -> Tuple[str, str]:
    """(outcome, detail) of one case."""
    try:
        kept = list(case.keep(env))
    except Exception as e:  # noqa: BLE001 - setting up the files to keep failed: the code under test crashed
        return "crash", f"setting up the case: {type(e).__name__}: {e}"
    before = _sha_tree(kept)
    try:
        res = case.run(env)
    except case.errors as e:
        msg = str(e)
        outcome = ("clear" if case.check is None and all(k.lower() in msg.lower() for k in case.keywords)
                   else "unclear" if case.check is None else "crash")
        detail = f"{type(e).__name__}: {msg}"
    except Exception as e:  # noqa: BLE001 - any other exception is a crash of the case
        outcome, detail = "crash", f"{type(e).__name__}: {e}"
    else:
        outcome, detail = _judge(case, res)
    after = _sha_tree(kept)
    if before != after:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return "lost", f"{detail}; files changed or removed: {changed[:4]}"
    return outcome, detail


def _judge(case: Case, res) -> Tuple[str, str]:
    if isinstance(res, (Cli, Child)):
        detail = f"rc {res.rc}: {res.err.strip()[-400:]}"
        if isinstance(res, Child) and res.rc < 0:
            return "crash", f"killed by signal {-res.rc}: {res.err.strip()[-300:]}"
        if "Traceback" in res.err:
            return "crash", detail
        if case.check is not None:
            try:
                case.check(res)
            except AssertionError as e:
                return "silent", f"{detail} | check failed: {e}"
            return "correct", detail
        if res.rc == 0:
            return "silent", detail
        lines = [ln for ln in res.err.splitlines() if ln.strip()]
        one_line = len(lines) == 1 and res.rc == case.cli_rc
        has = all(k.lower() in res.err.lower() for k in case.keywords)
        return ("clear" if one_line and has else "unclear"), detail
    if case.check is None:
        return "silent", f"no error; returned {type(res).__name__}"
    try:
        case.check(res)
    except AssertionError as e:
        return "silent", f"check failed: {e}"
    return "correct", "handled"


# ------------------------------------------------------------------------------------ fixtures

class Env:
    """Files the cases use, made lazily in ``root`` (a fresh temporary directory per trial)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._n = 0
        self._cache = {}

    def fresh(self, name="d") -> Path:
        self._n += 1
        p = self.root / f"{name}{self._n}"
        return p

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def text(self) -> Path:
        def make():
            p = self.root / "text.txt"
            p.write_text(TEXT, encoding="utf-8")
            return p
        return self._once("text", make)

    def tokenizer(self):
        from kop_triton.tokenizers import CharTokenizer
        return CharTokenizer(TEXT)

    def model(self, **kw):
        from kop_triton.model import KStackConfig, KStackLM
        torch.manual_seed(0)
        cfg = dict(vocab_size=self.tokenizer().vocab_size, d_model=8, n_k2=1, rank=2, kernel_size=4,
                   gamma_min=0.1, alpha_cap=2.0, backend="chunked")
        cfg.update(kw)
        return KStackLM(KStackConfig(**cfg)).eval()

    def rosa_model(self):
        return self._once("rosa_model", lambda: self.model(rosa="exact"))

    def plain_model(self):
        return self._once("plain_model", lambda: self.model())

    @property
    def ckpt(self) -> Path:
        """A kop-triton checkpoint directory (never written to by a case)."""
        def make():
            from kop_triton.checkpoint import save_checkpoint
            p = self.root / "ckpt"
            save_checkpoint(p, self.plain_model(), self.tokenizer())
            return p
        return self._once("ckpt", make)

    def ckpt_copy(self) -> Path:
        """A fresh copy of ``ckpt`` a case may try to overwrite."""
        import shutil
        p = self.fresh("ckptcopy")
        shutil.copytree(self.ckpt, p)
        return p

    @property
    def ref_pt(self) -> Path:
        """A synthetic reference-implementation checkpoint (the layout of tests/test_convert.py)."""
        def make():
            sys.path.insert(0, str(HERE))
            from test_convert import save_reference
            p = self.root / "ref.pt"
            save_reference(p, self.model(gamma_min=0.1, alpha_cap=2.0))
            return p
        return self._once("ref_pt", make)

    def weights_only_dir(self) -> Path:
        """A folder holding a model.safetensors and no config.json (someone's weights)."""
        p = self.fresh("weights")
        p.mkdir()
        (p / "model.safetensors").write_bytes((self.ckpt / "model.safetensors").read_bytes())
        (p / "notes.txt").write_text("my weights\n")
        return p

    def run_dir(self) -> Path:
        """A folder that looks like a kop-train run (log.jsonl and last/)."""
        import shutil
        p = self.fresh("run")
        p.mkdir()
        (p / "log.jsonl").write_text('{"event": "start"}\n')
        shutil.copytree(self.ckpt, p / "last")
        return p

    def file(self, name: str, data: bytes) -> Path:
        p = self.fresh("f") 
        p.mkdir()
        q = p / name
        q.write_bytes(data)
        return q


# ------------------------------------------------------------------------------------ runners

def cli(module: str, argv) -> Cli:
    """Run ``module.main(argv)`` in this process, capturing its output; SystemExit (argparse) is an
    exit status.  An exception escaping ``main`` propagates (the trial records a crash)."""
    import importlib
    mod = importlib.import_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = mod.main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            if not isinstance(e.code, int) and e.code is not None:
                err.write(str(e.code) + "\n")
    if isinstance(rc, dict):   # benchmarks.run returns its document
        rc = 0
    return Cli(int(rc or 0), out.getvalue(), err.getvalue())


def child(code: str, timeout: float = 120, env_extra=None, interrupt_after: Optional[float] = None) -> Child:
    """Run python ``code`` in a child process (optionally sending SIGINT after some seconds)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None) if env_extra and env_extra.pop("_no_interp", False) else None
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=str(ROOT))
    if interrupt_after is not None:
        time.sleep(interrupt_after)
        p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return Child(p.returncode, out, err)


def _call(fn):
    return fn


# ------------------------------------------------------------------------------------ checks

def _rc(want):
    def check(r):
        assert r.rc == want, f"exit status {r.rc}, expected {want}"
    return check


def _interrupt_check(prog):
    def check(r):
        lines = [ln for ln in r.err.splitlines() if ln.strip()]
        assert r.rc == 130, f"exit status {r.rc}, expected 130; stderr {r.err[-300:]!r}"
        assert len(lines) == 1 and lines[0].startswith(prog) and "interrupted" in lines[0], r.err[-300:]
    return check


# ------------------------------------------------------------------------------------ the cases

def _ids(*shape, high=10):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(0))


def _rosa(code_expr: str) -> Callable:
    """A ROSA call in a child process (a segfault must not take the trial down)."""
    def run(env):
        r = child("import torch\nfrom kop_triton.rosa import rosa_next_ids, RosaStream\n"
                  "try:\n"
                  f"    {code_expr}\n"
                  "    print('RESULT ok')\n"
                  "except (ValueError, TypeError) as e:\n"
                  "    print('RESULT error', type(e).__name__, e)\n")
        if r.rc < 0 or "RESULT" not in r.out:
            return r                                    # crash (signal) or traceback
        line = r.out.split("RESULT", 1)[1].strip()
        if line.startswith("error"):
            raise ValueError(line[len("error"):].strip())
        return r
    return run


def _fuzz_rosa(env):
    code = r"""
import random, torch
from kop_triton.rosa import rosa_next_ids, RosaStream, naive_rosa_next_ids
rng = random.Random(0)
dtypes = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32, torch.bool]
vals = [0, 1, 2, 64, 255, 256, 2**15, 2**24 - 1, 2**24, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1,
        -1, -2, -2**31, -2**63]
ok = err = 0
for i in range(400):
    B, T = rng.choice([0, 1, 2, 3]), rng.choice([0, 1, 2, 5, 33])
    dt = rng.choice(dtypes)
    x = [[rng.choice(vals) if rng.random() < 0.2 else rng.randrange(0, 5) for _ in range(T)] for _ in range(B)]
    vocab = rng.choice([None, 1, 5, 256, 2**24, 2**24 + 1, 2**31, 2**62, 0, -3])
    mode = rng.choice(["exact", "reference"])
    try:
        ids = torch.tensor(x, dtype=torch.int64).to(dt) if B else torch.empty((0, T), dtype=dt)
    except (RuntimeError, OverflowError):
        continue
    try:
        out = rosa_next_ids(ids, mode, vocab_size=vocab)
        if mode == "exact" and B and T:
            assert out[0].tolist() == naive_rosa_next_ids(ids[0].long()), "wrong ROSA ids"
        ok += 1
    except (ValueError, TypeError):
        err += 1
    try:
        s = RosaStream(max(B, 1), rng.choice([1, 5, 300, 2**24, 2**24 + 1, 2**40]), mode,
                       window=rng.choice([None, 1, 3]))
        for t in range(min(T, 5)):
            s.push(torch.tensor([rng.choice(vals + [0, 1, 2])] * s.batch_size))
        s.clone()
        ok += 1
    except (ValueError, TypeError):
        err += 1
print("FUZZ", ok, err)
"""
    return child(code, timeout=300)


def _model_call(fn):
    def run(env):
        return fn(env)
    return run


def _koperator():
    from kop_triton.modules import KOperator
    torch.manual_seed(0)
    return KOperator(8, rank=2, kernel_size=4, backend="chunked")


def _compiled_scan_bad_gamma(env):
    from kop_triton.ops import decayed_scan
    q, k, v = torch.randn(1, 8, 2), torch.randn(1, 8, 2), torch.randn(1, 8, 3)
    gamma = torch.full((2,), 1.5)
    f = torch.compile(lambda *a: decayed_scan(*a, backend="chunked")[0], fullgraph=True)
    return f(q, k, v, gamma)


def _hf_tokenizer_bad_vocab(env):
    from kop_triton.hf import KStackCharTokenizer
    p = env.file("kstack_chars.json", b'{"chars": "\xff\xfe abc"}')
    return KStackCharTokenizer(vocab_file=str(p))


def _save_hf_into(env, target, overwrite=False):
    from kop_triton.hf import save_hf
    return save_hf(target, env.plain_model(), env.tokenizer(), overwrite=overwrite)


def _hf_dir(env):
    p = env.fresh("hf")
    _save_hf_into(env, p)
    return p


def _convert(env, out, *more, src=None, text=None):
    return cli("kop_triton.convert", [src or env.ref_pt, out, "--tokenizer", "char", "--text", text or env.text,
                                      "--gamma-min", "0.1", "--alpha-cap", "2.0", *more])


def _train(env, *args):
    out = [] if "--out" in args else ["--out", env.fresh("out")]   # never the default runs/ of the cwd
    return cli("kop_triton.train", ["--text", env.text, *TINY, *out, *args])


def _bench(*args):
    return cli("benchmarks.run", ["--quick", "--no-plots", "--quiet", *args])


def _check_loads(path_fn):
    def check(r):
        assert r.rc == 0, f"exit status {r.rc}: {r.err[-200:]}"
    return check


# the tools' start-up made deterministically slow (5 s before importing the tool, as a cold import
# of torch can take), so that the SIGINT sent after 0.4 s lands inside it on any machine
SLOW_IMPORT = ("import importlib, runpy, sys, time\n_real = importlib.import_module\n"
               "def _slow(name, *a):\n    time.sleep(5)\n    return _real(name, *a)\n"
               "importlib.import_module = _slow\n")


def _cases() -> list:
    C = []

    def add(area, name, run, keywords=(), **kw):
        C.append(Case(area, name, run, tuple(keywords), **kw))

    I = dict(origin="issue")
    # ---------------------------------------------------------------------------- ROSA
    add("rosa", "rosa_next_ids id 2**31 (segfault before)", _rosa("rosa_next_ids(torch.tensor([[1, 2**31, 1]]), 'exact')"),
        ["ids", "2,147,483,648"], **I)
    add("rosa", "rosa_next_ids id 2**62 (segfault before)", _rosa("rosa_next_ids(torch.tensor([[1, 2**62, 1]]), 'exact')"),
        ["ids"], **I)
    add("rosa", "rosa_next_ids vocab_size=2**62 (segfault before)",
        _rosa("rosa_next_ids(torch.tensor([[1, 2, 1]]), 'exact', vocab_size=2**62)"), ["vocab_size"], **I)
    add("rosa", "rosa_next_ids id 2**40 (out of memory before)", _rosa("rosa_next_ids(torch.tensor([[1, 2**40, 1]]), 'exact')"),
        ["ids"], **I)
    add("rosa", "RosaStream vocab_size 2**40", _rosa("RosaStream(1, 2**40)"), ["vocab_size"])
    add("rosa", "RosaStream vocab_size 2**62", _rosa("RosaStream(2, 2**62, 'reference')"), ["vocab_size"])
    add("rosa", "fuzz: 400 random ids / dtypes / vocab sizes through rosa_next_ids and RosaStream",
        _fuzz_rosa, check=lambda r: (assert_(r.rc == 0 and "FUZZ" in r.out, r.err[-300:])), slow=True)
    from kop_triton.rosa import RosaStream, rosa_next_ids, naive_rosa_next_ids
    add("rosa", "negative id", lambda e: rosa_next_ids(torch.tensor([[1, -1, 2]])), ["ids", "-1"])
    add("rosa", "float ids", lambda e: rosa_next_ids(torch.tensor([[1.0, 2.0]])), ["ids", "integer"])
    add("rosa", "3-D ids", lambda e: rosa_next_ids(torch.zeros(1, 2, 3, dtype=torch.long)), ["ids", "shape"])
    add("rosa", "unknown mode", lambda e: rosa_next_ids(_ids(1, 4), "fast"), ["mode", "fast"])
    add("rosa", "vocab_size 0", lambda e: rosa_next_ids(_ids(1, 4), vocab_size=0), ["vocab_size"])
    add("rosa", "vocab_size float", lambda e: rosa_next_ids(_ids(1, 4), vocab_size=10.0), ["vocab_size"])
    add("rosa", "id == vocab_size", lambda e: rosa_next_ids(torch.tensor([[1, 5]]), vocab_size=5), ["ids", "5"])
    add("rosa", "num_threads 0", lambda e: rosa_next_ids(_ids(1, 4), num_threads=0), ["num_threads"])
    add("rosa", "empty batch (0, 5) -> empty result", lambda e: rosa_next_ids(torch.zeros(0, 5, dtype=torch.long)),
        check=lambda r: assert_(tuple(r.shape) == (0, 5), r.shape))
    add("rosa", "uint8 ids equal the definition", lambda e: (rosa_next_ids(torch.tensor([3, 1, 3, 1, 3], dtype=torch.uint8))),
        check=lambda r: assert_(r.tolist() == naive_rosa_next_ids([3, 1, 3, 1, 3]), r))
    add("rosa", "RosaStream batch_size 0", lambda e: RosaStream(0, 5), ["batch_size"])
    add("rosa", "RosaStream window 0", lambda e: RosaStream(1, 5, window=0), ["window"])
    add("rosa", "RosaStream push wrong shape", lambda e: RosaStream(2, 5).push(torch.tensor([1])), ["ids_t", "(2,)"])
    add("rosa", "RosaStream push out of range", lambda e: RosaStream(1, 5).push(torch.tensor([7])), ["ids_t", "7"])
    add("rosa", "RosaStream push float", lambda e: RosaStream(1, 5).push(torch.tensor([1.0])), ["ids_t"])
    add("rosa", "RosaStream extend out of range", lambda e: RosaStream(1, 5).extend(torch.tensor([[1, 9]])), ["ids", "9"])

    # ---------------------------------------------------------------------------- the LM
    def m(env):
        return env.plain_model()

    V = len(set(TEXT))
    ids = _ids(2, 6, high=V)
    add("model", "targets all -100 (NaN before)", lambda e: m(e)(ids, torch.full_like(ids, -100)),
        ["targets", "-100"], **I)
    add("model", "targets=99 (an int)", lambda e: m(e)(ids, 99), ["targets"], **I)
    add("model", "targets out of range", lambda e: m(e)(ids, torch.full_like(ids, 99)), ["targets", "99"])
    add("model", "targets negative other than -100", lambda e: m(e)(ids, torch.full_like(ids, -5)), ["targets", "-5"])
    add("model", "targets float", lambda e: m(e)(ids, ids.float()), ["targets", "float"])
    add("model", "targets wrong shape", lambda e: m(e)(ids, ids[:, :3]), ["targets", "shape"])
    add("model", "some targets -100 are ignored",
        lambda e: (m(e)(ids, torch.where(torch.arange(6) < 3, ids, -100)), m(e)(ids[:, :3], ids[:, :3])),
        check=lambda r: assert_(torch.isfinite(r[0]).item(), r))
    add("model", "generate OOV prompt, max_new_tokens=0", lambda e: m(e).generate(torch.tensor([[V + 3]]), 0),
        ["ids", str(V + 3)], **I)
    add("model", "generate max_new_tokens -1", lambda e: m(e).generate(ids, -1), ["max_new_tokens"])
    add("model", "generate max_new_tokens 2.5", lambda e: m(e).generate(ids, 2.5), ["max_new_tokens"])
    add("model", "generate temperature -1", lambda e: m(e).generate(ids, 2, temperature=-1.0), ["temperature"])
    add("model", "generate temperature nan", lambda e: m(e).generate(ids, 2, temperature=float("nan")), ["temperature"])
    add("model", "generate top_k 0", lambda e: m(e).generate(ids, 2, top_k=0), ["top_k"])
    add("model", "generate top_p 0", lambda e: m(e).generate(ids, 2, top_p=0.0), ["top_p"])
    add("model", "generate top_p 1.5", lambda e: m(e).generate(ids, 2, top_p=1.5), ["top_p"])
    add("model", "generate float prompt", lambda e: m(e).generate(ids.float(), 2), ["ids"])
    add("model", "generate empty prompt", lambda e: m(e).generate(ids[:, :0], 2), ["ids", "non-empty"])
    add("model", "generate rosa_window on ROSA-off model", lambda e: m(e).generate(ids, 2, rosa_window=4), ["rosa_window", "off"], **I)
    add("model", "generate rosa_window on ROSA-off model, max_new_tokens=0",
        lambda e: m(e).generate(ids, 0, rosa_window=4), ["rosa_window", "off"])
    add("model", "3-D ids", lambda e: m(e)(ids[None]), ["ids", "shape"])
    add("model", "ids out of vocabulary", lambda e: m(e)(ids + V), ["ids", "vocab_size"])
    add("model", "ids float", lambda e: m(e)(ids.float()), ["ids"])
    add("model", "step ids_t 2-D", lambda e: m(e).step(ids), ["ids_t"])
    add("model", "step ids_t out of vocabulary", lambda e: m(e).step(torch.tensor([V])), ["ids_t", str(V)])
    add("model", "rosa_ids on a ROSA-off model", lambda e: m(e)(ids, rosa_ids=ids), ["rosa_ids", "off"])
    add("model", "ROSA model rosa_ids -2 (IndexError before)", lambda e: e.rosa_model()(ids, rosa_ids=torch.full_like(ids, -2)),
        ["rosa_ids", "-2"], **I)
    add("model", "ROSA model rosa_ids >= vocab (IndexError before)",
        lambda e: e.rosa_model()(ids, rosa_ids=torch.full_like(ids, V)), ["rosa_ids", str(V)], **I)
    add("model", "ROSA model float rosa_ids (accepted before)", lambda e: e.rosa_model()(ids, rosa_ids=ids.float()),
        ["rosa_ids", "int"], **I)
    add("model", "ROSA model rosa_ids wrong shape", lambda e: e.rosa_model()(ids, rosa_ids=ids[:, :2]), ["rosa_ids", "shape"])
    add("model", "ROSA model rosa_window=0 (named 'window' before)",
        lambda e: e.rosa_model().generate(ids, 2, rosa_window=0), ["rosa_window"], **I)
    add("model", "ROSA model -1 rosa_ids are valid", lambda e: e.rosa_model()(ids, rosa_ids=torch.full_like(ids, -1)),
        check=lambda r: assert_(r.shape == (2, 6, V), r.shape))
    from kop_triton.model import KStackConfig

    def cfg(**kw):
        base = dict(vocab_size=V, d_model=8, n_k2=2, rank=2, kernel_size=4)
        base.update(kw)
        return lambda e: KStackConfig(**base)
    add("model", "config rosa_layers with ROSA off (accepted before)", cfg(rosa_layers=[0]), ["rosa_layers", "off"], **I)
    add("model", "config rosa_layers out of range", cfg(rosa="exact", rosa_layers=[5]), ["rosa_layers", "n_k2"])
    add("model", "config vocab_size 0", cfg(vocab_size=0), ["vocab_size"])
    add("model", "config gamma_min 0", cfg(gamma_min=0.0), ["gamma_min"])
    add("model", "config gamma_min > gamma_max", cfg(gamma_min=0.9, gamma_max=0.5), ["gamma_min", "gamma_max"])
    add("model", "config kernel_size 10**6", cfg(kernel_size=10 ** 6), ["kernel_size"])
    add("model", "config head 'softmax'", cfg(head="softmax"), ["head", "softmax"])
    add("model", "config backend 'cuda'", cfg(backend="cuda"), ["backend", "cuda"])
    add("model", "config emb_dropout 1.0", cfg(emb_dropout=1.0), ["emb_dropout"])
    add("model", "config head_dropout with linear head", cfg(head_dropout=0.1), ["head_dropout", "linear"])
    add("model", "config rosa 'fast'", cfg(rosa="fast"), ["rosa", "fast"])
    add("model", "config vocab_size 2.5", cfg(vocab_size=2.5), ["vocab_size"])
    add("model", "set_rosa on a ROSA-off model", lambda e: e.model().set_rosa("exact"), ["rosa", "off"])
    add("model", "set_backend 'fast'", lambda e: e.model().set_backend("fast"), ["backend", "fast"])

    # ---------------------------------------------------------------------------- KOperator / ops
    add("koperator", "step with an int tensor (suggested .to(int64) before)",
        lambda e: _koperator().step(torch.ones(2, 8, dtype=torch.long)), ["x_t", "floating"], **I)
    add("koperator", "forward with an int tensor", lambda e: _koperator()(torch.ones(1, 3, 8, dtype=torch.long)),
        ["x", "floating"])
    add("koperator", "step wrong width", lambda e: _koperator().step(torch.ones(2, 5)), ["x_t", "D=8"])
    add("koperator", "step bad state", lambda e: _koperator().step(torch.ones(2, 8), (torch.ones(1), torch.ones(1))),
        ["state"])
    add("koperator", "forward 2-D input", lambda e: _koperator()(torch.ones(3, 8)), ["x"])
    add("koperator", "float64 input to float32 module", lambda e: _koperator()(torch.ones(1, 3, 8, dtype=torch.float64)),
        ["x", "float64"])
    from kop_triton.ops import decayed_scan
    add("koperator", "decayed_scan gamma 1.5 (eager)",
        lambda e: decayed_scan(torch.ones(1, 4, 2), torch.ones(1, 4, 2), torch.ones(1, 4, 3), torch.full((2,), 1.5)),
        ["gamma", "1.5"])
    add("koperator", "compiled decayed_scan gamma 1.5 (RuntimeError without the value before)",
        _compiled_scan_bad_gamma, ["gamma must lie in (0, 1]", "eager"], errors=(ValueError, RuntimeError),
        slow=True, **I)
    add("koperator", "decayed_scan backend 'fast'",
        lambda e: decayed_scan(torch.ones(1, 4, 2), torch.ones(1, 4, 2), torch.ones(1, 4, 3), torch.full((2,), 0.5),
                               backend="fast"), ["backend", "fast"])

    # ---------------------------------------------------------------------------- checkpoints
    from kop_triton.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    CK = (CheckpointError, ValueError, TypeError)
    add("checkpoint", "load a .pt file (said 'does not exist' before)",
        lambda e: load_checkpoint(e.file("model.pt", b"PK\x03\x04")), ["kop-convert"], errors=CK, **I)
    add("checkpoint", "load model.safetensors (the file, not its folder)",
        lambda e: load_checkpoint(e.ckpt / "model.safetensors"), ["pass its directory"], errors=CK)
    add("checkpoint", "load a missing folder", lambda e: load_checkpoint(e.root / "nope"), ["does not exist"], errors=CK)
    add("checkpoint", "load a folder without config.json", lambda e: load_checkpoint(e.weights_only_dir()),
        ["config.json", "missing"], errors=CK)

    def flipped(env):
        p = env.ckpt_copy()
        b = bytearray((p / "model.safetensors").read_bytes())
        b[-3] ^= 0x01
        (p / "model.safetensors").write_bytes(bytes(b))
        return load_checkpoint(p)
    add("checkpoint", "a flipped byte in the weights", flipped, ["SHA-256"], errors=CK)

    def edit_config(change):
        def run(env):
            p = env.ckpt_copy()
            cfg = json.loads((p / "config.json").read_text())
            change(cfg)
            (p / "config.json").write_text(json.dumps(cfg))
            return load_checkpoint(p)
        return run
    add("checkpoint", "tokenizer with fewer characters than vocab_size (loaded before)",
        edit_config(lambda c: c["tokenizer"].update(chars=c["tokenizer"]["chars"][:-2])), ["tokenizer", "vocab_size"],
        errors=CK, **I)
    add("checkpoint", "config.json with a bad model field", edit_config(lambda c: c["model"].update(d_model=0)),
        ["d_model"], errors=CK)
    add("checkpoint", "config.json of another format", edit_config(lambda c: c.update(format="other")),
        ["not a kop-triton-checkpoint"], errors=CK)
    add("checkpoint", "config.json not JSON", lambda e: (lambda p: ((p / "config.json").write_text("{"), load_checkpoint(p)))(e.ckpt_copy()),
        ["corrupted"], errors=CK)
    add("checkpoint", "save with a tokenizer of another vocabulary size",
        lambda e: save_checkpoint(e.fresh(), e.model(vocab_size=V + 5), e.tokenizer()), ["tokenizer", "vocab_size"],
        errors=CK)
    add("checkpoint", "save a module that is not a KStackLM",
        lambda e: save_checkpoint(e.fresh(), torch.nn.Linear(2, 2), e.tokenizer()), ["KStackLM"], errors=CK)

    # ---------------------------------------------------------------------------- kop-convert
    P = "kop-convert: error:"
    add("convert", "OUT_DIR holds model.safetensors, no config.json (overwritten before)",
        lambda e: _convert(e, e._cache.setdefault("w1", e.weights_only_dir())), [P, "model.safetensors"],
        keep=lambda e: [e._cache.setdefault("w1", e.weights_only_dir())], **I)
    add("convert", "same with --format hf (overwritten before)",
        lambda e: _convert(e, e._cache.setdefault("w2", e.weights_only_dir()), "--format", "hf"),
        [P, "model.safetensors"], keep=lambda e: [e._cache.setdefault("w2", e.weights_only_dir())], **I)
    add("convert", "OUT_DIR is a kop-train run (model written beside last/ before)",
        lambda e: _convert(e, e._cache.setdefault("r1", e.run_dir())), [P, "kop-train run"],
        keep=lambda e: [e._cache.setdefault("r1", e.run_dir())], **I)
    add("convert", "OUT_DIR holds a checkpoint, no --overwrite",
        lambda e: _convert(e, e._cache.setdefault("c1", e.ckpt_copy())), [P, "--overwrite"],
        keep=lambda e: [e._cache.setdefault("c1", e.ckpt_copy())])
    add("convert", "OUT_DIR holds a checkpoint, --overwrite replaces it",
        lambda e: (lambda p: (_convert(e, p, "--overwrite"), load_checkpoint(p)))(e.ckpt_copy()),
        check=lambda r: assert_(r[0].rc == 0 and r[1][0].config.gamma_min == 0.1, r[0]))
    add("convert", "--format hf over a kop checkpoint, even with --overwrite",
        lambda e: _convert(e, e._cache.setdefault("c2", e.ckpt_copy()), "--format", "hf", "--overwrite"),
        [P, "kop-triton checkpoint"], keep=lambda e: [e._cache.setdefault("c2", e.ckpt_copy())])
    add("convert", "OUT_DIR is a file", lambda e: _convert(e, e.text), [P, "is a file"], keep=lambda e: [e.text])
    add("convert", "--text an empty file (traceback before)", lambda e: _convert(e, e.fresh(), text=e.file("t.txt", b"")),
        [P, "--text", "empty"], **I)
    add("convert", "--text a folder ('file not found' before)", lambda e: _convert(e, e.fresh(), text=e.root),
        [P, "--text", "directory"], **I)
    add("convert", "--text not UTF-8", lambda e: _convert(e, e.fresh(), text=e.file("t.txt", b"\xff\xfe\x00a")),
        [P, "--text", "UTF-8"])
    add("convert", "--text of another vocabulary", lambda e: _convert(e, e.fresh(), text=e.file("t.txt", b"abc")),
        [P, "tokens", "--text"])
    add("convert", "SRC a checkpoint folder ('does not exist' before)", lambda e: _convert(e, e.fresh(), src=e.ckpt),
        [P, "directory", "no conversion"], **I)
    add("convert", "SRC model.safetensors ('unexpected layer sequence []' before)",
        lambda e: _convert(e, e.fresh(), src=e.ckpt / "model.safetensors"), [P, "safetensors"], **I)
    add("convert", "SRC missing", lambda e: _convert(e, e.fresh(), src=e.root / "none.pt"), [P, "does not exist"])
    add("convert", "SRC a text file", lambda e: _convert(e, e.fresh(), src=e.text), [P, "cannot load"])
    add("convert", "SRC a torch file without K-Stack layers",
        lambda e: _convert(e, e.fresh(), src=(lambda p: (torch.save({"model": {"w": torch.ones(2)}}, p), p)[1])(e.root / "other.pt")),
        [P, "K-Stack layers"])
    add("convert", "--tokenizer bpe", lambda e: cli("kop_triton.convert", [e.ref_pt, e.fresh(), "--tokenizer", "bpe",
                                                                         "--gamma-min", "0.1", "--alpha-cap", "2"]),
        ["--tokenizer", "bpe"])
    add("convert", "--gamma-min 0", lambda e: cli("kop_triton.convert", [e.ref_pt, e.fresh(), "--tokenizer", "char", "--text",
                                                                       e.text, "--gamma-min", "0", "--alpha-cap", "2"]),
        [P, "gamma_min"])
    add("convert", "--alpha-cap -1", lambda e: cli("kop_triton.convert", [e.ref_pt, e.fresh(), "--tokenizer", "char", "--text",
                                                                        e.text, "--gamma-min", "0.1", "--alpha-cap", "-1"]),
        [P, "alpha_cap"])
    add("convert", "--window 0", lambda e: _convert(e, e.fresh(), "--window", "0"), [P, "window"])
    add("convert", "--rosa exact on untrained ROSA weights", lambda e: _convert(e, e.fresh(), "--rosa", "exact"),
        [P, "never trained"])
    add("convert", "--format onnx", lambda e: _convert(e, e.fresh(), "--format", "onnx"), ["--format", "onnx"])

    # ---------------------------------------------------------------------------- kop-train
    T = "kop-train: error:"
    add("train", "--out /proc/x (traceback before)", lambda e: _train(e, "--out", "/proc/x"), [T, "/proc/x"], **I)
    add("train", "--out a model folder (a run written into it before)",
        lambda e: _train(e, "--out", e._cache.setdefault("tc", e.ckpt_copy())), [T, "--out", "kop-triton checkpoint"],
        keep=lambda e: [e._cache.setdefault("tc", e.ckpt_copy())], **I)
    add("train", "--out a folder of other files",
        lambda e: _train(e, "--out", e._cache.setdefault("tw", e.weights_only_dir())), [T, "--out", "notes.txt"],
        keep=lambda e: [e._cache.setdefault("tw", e.weights_only_dir())])
    add("train", "--out an existing run without --resume",
        lambda e: _train(e, "--out", e._cache.setdefault("tr", e.run_dir())), [T, "--resume"],
        keep=lambda e: [e._cache.setdefault("tr", e.run_dir())])
    add("train", "--out a file", lambda e: _train(e, "--out", e.text), [T, "is a file"], keep=lambda e: [e.text])
    add("train", "--resume in a model folder", lambda e: _train(e, "--out", e.ckpt_copy(), "--resume"), [T, "no checkpoint"])
    add("train", "--clip-grad-norm -1 (accepted before)", lambda e: _train(e, "--clip-grad-norm", "-1"),
        [T, "--clip-grad-norm"], **I)
    add("train", "--clip-grad-norm nan", lambda e: _train(e, "--clip-grad-norm", "nan"), [T, "--clip-grad-norm"])
    add("train", "--rosa-layers 0 with ROSA off (accepted before)", lambda e: _train(e, "--rosa-layers", "0"),
        [T, "rosa_layers", "off"], **I)
    add("train", "--seed 2**70 (an overflow message before)", lambda e: _train(e, "--seed", str(2 ** 70)), [T, "--seed"], **I)
    add("train", "--seed -1", lambda e: _train(e, "--seed", "-1"), [T, "--seed"])
    add("train", "--steps 0", lambda e: _train(e, "--steps", "0"), [T, "--steps"])
    add("train", "--batch-size 0", lambda e: _train(e, "--batch-size", "0"), [T, "--batch-size"])
    add("train", "--lr 0", lambda e: _train(e, "--lr", "0"), [T, "--lr"])
    add("train", "--lr-floor above --lr", lambda e: _train(e, "--lr", "0.001", "--lr-floor", "0.01"), [T, "--lr-floor"])
    add("train", "--warmup-steps -1", lambda e: _train(e, "--warmup-steps", "-1"), [T, "--warmup-steps"])
    add("train", "--beta1 1.5", lambda e: _train(e, "--beta1", "1.5"), [T, "--beta1"])
    add("train", "--weight-decay -1", lambda e: _train(e, "--weight-decay", "-1"), [T, "--weight-decay"])
    add("train", "--emb-lr-mult nan", lambda e: _train(e, "--emb-lr-mult", "nan"), [T, "--emb-lr-mult"])
    add("train", "--val-frac 0", lambda e: _train(e, "--val-frac", "0"), [T, "--val-frac"])
    add("train", "--val-frac 1.5", lambda e: _train(e, "--val-frac", "1.5"), [T, "--val-frac"])
    add("train", "--threads 0", lambda e: _train(e, "--threads", "0"), [T, "--threads"])
    add("train", "--eval-interval 0", lambda e: _train(e, "--eval-interval", "0"), [T, "--eval-interval"])
    add("train", "--eval-window 0", lambda e: _train(e, "--eval-window", "0"), [T, "--eval-window"])
    add("train", "--max-eval-tokens 0", lambda e: _train(e, "--max-eval-tokens", "0"), [T, "--max-eval-tokens"])
    add("train", "--log-interval -1", lambda e: _train(e, "--log-interval", "-1"), [T, "--log-interval"])
    add("train", "--text missing", lambda e: cli("kop_triton.train", ["--text", e.root / "none.txt", *TINY, "--out", e.fresh("out")]),
        [T, "--text", "not found"])
    add("train", "--text a folder", lambda e: cli("kop_triton.train", ["--text", e.root, *TINY, "--out", e.fresh("out")]), [T, "--text", "directory"])
    add("train", "--text not UTF-8", lambda e: cli("kop_triton.train", ["--text", e.file("t.txt", b"\xff\xfeab" * 50), *TINY, "--out", e.fresh("out")]),
        [T, "UTF-8"])
    add("train", "--dataset and --text", lambda e: _train(e, "--dataset", "tinyshakespeare"), [T, "either"])
    add("train", "--device meta", lambda e: _train(e, "--device", "meta"), [T, "--device", "meta"])
    add("train", "--device cuda:7", lambda e: _train(e, "--device", "cuda:7"), [T, "--device"])
    add("train", "--fsdp in a single process", lambda e: _train(e, "--fsdp"), [T, "--fsdp"])
    add("train", "--d-model 0", lambda e: _train(e, "--d-model", "0"), [T, "--d-model"])
    add("train", "--kernel-size 0", lambda e: _train(e, "--kernel-size", "0"), [T, "--kernel-size"])
    add("train", "--window 0", lambda e: _train(e, "--window", "0"), [T, "window"])
    add("train", "--emb-dropout 1", lambda e: _train(e, "--emb-dropout", "1"), [T, "--emb-dropout"])
    add("train", "--head-dropout with the linear head", lambda e: _train(e, "--head-dropout", "0.1"), [T, "head_dropout"])
    add("train", "--rosa fast", lambda e: _train(e, "--rosa", "fast"), [T, "rosa"])
    add("train", "--preset none-such", lambda e: _train(e, "--preset", "none-such"), [T, "--preset"])
    add("train", "--plot a missing run", lambda e: cli("kop_triton.train", ["--plot", e.root / "nope"]), [T, "not found"])
    add("train", "--plot with other flags", lambda e: cli("kop_triton.train", ["--plot", e.root, "--steps", "3"]),
        [T, "--plot"])
    add("train", "--tokenizer sentencepiece --sp-vocab-size 4", lambda e: _train(e, "--tokenizer", "sentencepiece",
                                                                                  "--sp-vocab-size", "4"),
        [T, "--sp-vocab-size"])

    def sp_small(env):
        out = env.fresh("sp")
        r = _train(env, "--tokenizer", "sentencepiece", "--sp-vocab-size", "8192", "--out", out)
        return r
    add("train", "--sp-vocab-size 8192 on a small text says it got fewer (silent before)", sp_small,
        check=lambda r: assert_(r.rc == 0 and "fewer than --sp-vocab-size 8,192" in r.err, r.err[-300:]), slow=True, **I)

    # ---------------------------------------------------------------------------- kop-eval
    E = "kop-eval: error:"

    def ev(env, *args, ckpt=None, text=None):
        return cli("kop_triton.eval", ["--checkpoint", ckpt or env.ckpt, "--text", text or env.text, "--window", "16",
                                       *args])
    add("eval", "--device meta (traceback before)", lambda e: ev(e, "--device", "meta"), [E, "--device", "meta"], **I)
    add("eval", "--checkpoint file.pt ('does not exist' before)", lambda e: ev(e, ckpt=e.file("m.pt", b"PK")),
        [E, "kop-convert"], **I)
    add("eval", "--checkpoint missing", lambda e: ev(e, ckpt=e.root / "none"), [E, "does not exist"])
    add("eval", "--window 0", lambda e: ev(e, "--window", "0"), [E, "--window"])
    add("eval", "--batch-size 0", lambda e: ev(e, "--batch-size", "0"), [E, "--batch-size"])
    add("eval", "--val-fraction 0", lambda e: ev(e, "--val-fraction", "0"), [E, "--val-fraction"])
    add("eval", "--val-fraction 1.5", lambda e: ev(e, "--val-fraction", "1.5"), [E, "--val-fraction"])
    add("eval", "--text a folder", lambda e: ev(e, text=e.root), [E, "--text", "directory"])
    add("eval", "--text too short for one window", lambda e: ev(e, text=e.file("t.txt", b"Speak")), [E, "window"])
    add("eval", "--text with characters outside the vocabulary", lambda e: ev(e, text=e.file("t.txt", "Ωμέγα" .encode() * 40)),
        [E, "vocabulary"])
    add("eval", "--rosa exact on a ROSA-off model", lambda e: ev(e, "--rosa", "exact"), [E, "ROSA"])
    add("eval", "--backend fast", lambda e: ev(e, "--backend", "fast"), ["--backend", "fast"])
    add("eval", "--device cuda without CUDA", lambda e: ev(e, "--device", "cuda"), [E, "CUDA"])

    # ---------------------------------------------------------------------------- kop-generate
    G = "kop-generate: error:"

    def gen(env, *args, ckpt=None):
        return cli("kop_triton.generate", ["--checkpoint", ckpt or env.ckpt, "--max-new-tokens", "3",
                                           "--device", "cpu", *args])
    add("generate", "--checkpoint file.pt ('does not exist' before)", lambda e: gen(e, ckpt=e.file("m.pt", b"PK")),
        [G, "kop-convert"], **I)
    add("generate", "--max-new-tokens -1", lambda e: gen(e, "--max-new-tokens", "-1"), [G, "--max-new-tokens"])
    add("generate", "--temperature -1", lambda e: gen(e, "--temperature", "-1"), [G, "--temperature"])
    add("generate", "--temperature nan", lambda e: gen(e, "--temperature", "nan"), [G, "--temperature"])
    add("generate", "--top-k 0", lambda e: gen(e, "--top-k", "0"), [G, "--top-k"])
    add("generate", "--top-p 0", lambda e: gen(e, "--top-p", "0"), [G, "--top-p"])
    add("generate", "--top-p 1.5", lambda e: gen(e, "--top-p", "1.5"), [G, "--top-p"])
    add("generate", "--rosa-window 0", lambda e: gen(e, "--rosa-window", "0"), [G, "--rosa-window"])
    add("generate", "--rosa-window on a ROSA-off model", lambda e: gen(e, "--rosa-window", "8"), [G, "--rosa-window", "off"])
    add("generate", "--prompt ''", lambda e: gen(e, "--prompt", ""), [G, "--prompt"])
    add("generate", "--prompt outside the vocabulary", lambda e: gen(e, "--prompt", "Ω"), [G, "vocabulary"])
    add("generate", "--device meta", lambda e: gen(e, "--device", "meta"), [G, "--device", "meta"])
    add("generate", "--max-new-tokens 0 prints the prompt", lambda e: gen(e, "--max-new-tokens", "0", "--prompt", "Speak"),
        check=lambda r: assert_(r.rc == 0 and r.out == "Speak\n", (r.rc, r.out)))

    # ---------------------------------------------------------------------------- HF
    def hf_needed(fn):
        def run(env):
            try:
                import transformers  # noqa: F401
            except ImportError:
                return Cli(0, "", "SKIP transformers not installed")
            return fn(env)
        return run
    add("hf", "kstack_chars.json not UTF-8 (UnicodeDecodeError without the file before)", hf_needed(_hf_tokenizer_bad_vocab),
        ["kstack_chars.json", "UTF-8"], **I)
    add("hf", "save_hf into a folder of other files", hf_needed(lambda e: _save_hf_into(e, e._cache.setdefault("h1", e.weights_only_dir()))),
        ["model.safetensors", "nothing was written"], errors=(ValueError, TypeError, CheckpointError),
        keep=lambda e: [e._cache.setdefault("h1", e.weights_only_dir())])
    add("hf", "save_hf over an HF model without overwrite",
        hf_needed(lambda e: _save_hf_into(e, e._cache.setdefault("h2", _hf_dir(e)))), ["overwrite=True"],
        errors=(ValueError, TypeError, CheckpointError), keep=lambda e: [e._cache.setdefault("h2", _hf_dir(e))])
    add("hf", "save_hf over an HF model with overwrite=True",
        hf_needed(lambda e: (lambda p: (_save_hf_into(e, p, overwrite=True), sorted(x.name for x in p.iterdir())))(_hf_dir(e))),
        check=lambda r: assert_(isinstance(r, Cli) or "config.json" in r[1], r))

    # ---------------------------------------------------------------------------- benchmarks.run
    B = "python -m benchmarks.run: error:"
    add("bench", "--threads 0 (ran the full benchmark before)", lambda e: _bench("--threads", "0"), [B, "--threads"], **I)
    add("bench", "--time-budget -1 (accepted before)", lambda e: _bench("--time-budget", "-1"), [B, "--time-budget"], **I)
    add("bench", "--max-minutes 0 (accepted before)", lambda e: _bench("--max-minutes", "0"), [B, "--max-minutes"], **I)
    add("bench", "--out an existing file (traceback before)", lambda e: _bench("--out", e.text), [B, "--out", "is a file"],
        keep=lambda e: [e.text], **I)
    add("bench", "--out an unwritable path (traceback before)", lambda e: _bench("--out", "/proc/x/y"), [B, "--out"], **I)
    add("bench", "--out a folder of another run (overwritten before)",
        lambda e: _bench("--out", e._cache.setdefault("b1", e.weights_only_dir())), [B, "--out", "already holds"],
        keep=lambda e: [e._cache.setdefault("b1", e.weights_only_dir())], **I)
    add("bench", "--mem-budget 0", lambda e: _bench("--mem-budget", "0"), [B, "--mem-budget"])
    add("bench", "--device meta", lambda e: _bench("--device", "meta"), [B, "--device", "meta"])
    add("bench", "--device cuda without CUDA", lambda e: _bench("--device", "cuda"), [B, "CUDA"])
    add("bench", "--modes fw", lambda e: _bench("--modes", "fw"), [B, "--modes", "fw"])
    add("bench", "--dtypes fp8", lambda e: _bench("--dtypes", "fp8"), [B, "--dtypes", "fp8"])
    add("bench", "--methods none/such", lambda e: _bench("--methods", "none/such"), [B, "none/such"])
    add("bench", "--tokens 0", lambda e: _bench("--tokens", "0"), [B, "--tokens"])
    add("bench", "--lm-steps 0", lambda e: _bench("--lm-steps", "0"), [B, "--lm-steps"])
    add("bench", "--T 0", lambda e: _bench("--T", "0"), ["--T"])

    def two_runs(env):
        from benchmarks.run import results_dir
        return results_dir(None, "cpu"), results_dir(None, "cpu")
    add("bench", "two default runs the same day get two folders (overwritten before)", two_runs,
        check=lambda r: assert_(r[0] != r[1] and all(os.path.isdir(p) for p in r), r) or [os.rmdir(p) for p in r], **I)

    # ---------------------------------------------------------------------------- the compile gate
    def gate(*args):
        def run(env):
            return child("import sys\nfrom kop_triton.gate import main\nsys.exit(main(%r))" % (list(args),),
                         timeout=600, env_extra={"_no_interp": True})
        return run
    R = "error"
    add("gate", "--targets '' (0 pass 0 fail, exit 0 before)", gate("--set", "ci", "--targets", ""), [R, "--targets"], **I)
    add("gate", "--md an unwritable path (traceback after every compile before)",
        gate("--set", "ci", "--kernel", "_k2_qk", "--md", "/proc/x/r.md"), [R, "--md", "/proc/x/r.md"], **I)
    add("gate", "--json a folder", gate("--set", "ci", "--json", "/tmp"), [R, "--json", "directory"])
    add("gate", "--targets sm_75", gate("--set", "ci", "--targets", "sm_75"), [R, "--targets"])

    # ---------------------------------------------------------------------------- Ctrl-C
    for prog, module in (("kop-train", "kop_triton.train"), ("kop-eval", "kop_triton.eval"),
                         ("kop-generate", "kop_triton.generate"), ("kop-convert", "kop_triton.convert")):
        code = (SLOW_IMPORT + f"sys.argv = ['{prog}', '--help']\n"
                f"from kop_triton.cli import {prog.replace('-', '_')} as entry\nentry()")
        add("interrupt", f"Ctrl-C during {prog}'s start-up (traceback before)",
            (lambda c: lambda e: child(c, interrupt_after=0.4))(code), check=_interrupt_check(prog), slow=True, **I)
    add("interrupt", "Ctrl-C during python -m kop_triton.train's start-up",
        lambda e: child(SLOW_IMPORT + "sys.argv = ['x', '--help']\nrunpy.run_module('kop_triton.train', run_name='__main__')",
                        interrupt_after=0.4),
        check=_interrupt_check("kop-train"), slow=True)

    def interrupt_in_main(env):
        import kop_triton.eval as kev
        from kop_triton.cli import run_tool
        old = kev.main

        def boom(argv=None):
            raise KeyboardInterrupt
        kev.main = boom
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                rc = run_tool("kop-eval", "kop_triton.eval", [])
        finally:
            kev.main = old
        return Cli(rc, "", err.getvalue())
    add("interrupt", "Ctrl-C inside a tool's main", interrupt_in_main, check=_interrupt_check("kop-eval"))
    return C


def assert_(cond, what=""):
    if not cond:
        raise AssertionError(str(what)[:300])


CASES = _cases()


def run_trial(root, include_slow: bool = True, areas=None) -> list:
    env = Env(root)
    rows = []
    for c in CASES:
        if (not include_slow and c.slow) or (areas and c.area not in areas):
            continue
        outcome, detail = classify(c, env)
        rows.append((c, outcome, detail))
    return rows


def table(rows) -> str:
    kinds = ["clear", "correct", "unclear", "crash", "silent", "lost"]
    areas = []
    for c, _, _ in rows:
        if c.area not in areas:
            areas.append(c.area)
    lines = ["| area | cases (issue / new) | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for a in areas + ["all"]:
        sel = [(c, o) for c, o, _ in rows if a == "all" or c.area == a]
        n_issue = sum(1 for c, _ in sel if c.origin == "issue")
        lines.append(f"| {a} | {len(sel)} ({n_issue} / {len(sel) - n_issue}) | "
                     + " | ".join(str(sum(1 for _, o in sel if o == k)) for k in kinds) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_trial(tmp, include_slow="--fast" not in sys.argv)
        for c, o, d in rows:
            if o not in ("clear", "correct"):
                print(f"{o.upper():8} [{c.area}] {c.name}: {d[:300]}")
        print(table(rows))
