"""Training CLI: optimiser recipe, schedule, end-to-end runs, checkpoints, kill/resume, errors, DDP.

Every run is tiny (d_model 16-32, window 32, a few dozen steps) on generated text.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kop_triton import curves as kcurves
from kop_triton import train as ktrain
from kop_triton.checkpoint import load_checkpoint
from kop_triton.data import encode, split_text
from kop_triton.eval import evaluate
from kop_triton.model import KStackConfig, KStackLM

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "24", "--n-k2", "2", "--rank", "4", "--kernel-size", "4", "--window", "32",
        "--batch-size", "8", "--warmup-steps", "5", "--lr", "1e-2", "--lr-floor", "1e-3", "--no-progress",
        "--eval-batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the CI machine has two cores for two workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_text(n_chars: int = 30_000, seed: int = 0) -> str:
    """Pseudo-English from a small vocabulary with a little grammar: learnable, not memorisable."""
    rng = random.Random(seed)
    nouns = ["king", "queen", "lord", "sword", "crown", "night", "day", "heart", "blood", "house"]
    verbs = ["takes", "loves", "fears", "keeps", "breaks", "sees", "holds"]
    adjs = ["noble", "dark", "sweet", "old", "proud", "fair"]
    out, size = [], 0
    while size < n_chars:
        s = f"the {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}"
        s += "." if rng.random() < 0.7 else ", and"
        s = s + ("\n" if rng.random() < 0.2 else " ")
        out.append(s)
        size += len(s)
    return "".join(out)


def make_wiki_text(n_chars: int, seed: int = 0, n_words: int = 1500) -> str:
    """WikiText-like lines (headings, sentences) over ``n_words`` made-up words: enough distinct
    pieces for a SentencePiece vocabulary of several hundred."""
    rng = random.Random(1234)
    syl = ["ka", "to", "ri", "mu", "sen", "dal", "vo", "pe", "lin", "gor", "ash", "eth", "qu", "ir", "bo", "zan"]
    words = sorted({"".join(rng.choice(syl) for _ in range(rng.randint(2, 4))) for _ in range(n_words)})
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        n = rng.randint(5, 20)
        line = (" = " + " ".join(rng.choices(words, k=3)) + " = \n") if rng.random() < 0.05 else \
            (" ".join(rng.choices(words, k=n)) + " . \n")
        out.append(line)
        size += len(line)
    return "".join(out)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def read_log(out: Path) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_log(out) if r["event"] == "train"}


def run_cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "kop_triton.train", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


# ------------------------------------------------------------------------------- pure pieces

def test_lr_schedule_warmup_cosine_floor():
    W, N, floor = 10, 110, 0.01
    f = [ktrain.lr_factor(s, W, N, floor) for s in range(N + 5)]
    # the reference's LambdaLR values, update for update: max(s, 1) / W, so updates 0 and 1 share 1 / W
    assert f[0] == f[1] == pytest.approx(1 / W) and f[4] == pytest.approx(4 / W)
    assert f[W - 1] == pytest.approx((W - 1) / W)
    assert f[W] == pytest.approx(1.0)                                     # cosine starts at the peak
    assert f[W + 50] == pytest.approx(floor + (1 - floor) * 0.5)         # half way: cos(pi/2) = 0
    assert f[W + 25] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f[N] == pytest.approx(floor) and f[N + 4] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(f[W:], f[W + 1:]))                 # monotone after warmup


def test_param_groups_follow_the_reference_recipe():
    model = KStackLM(KStackConfig(vocab_size=11, d_model=8, emb_dim=6, n_k2=2, rank=3, kernel_size=4,
                                  refine_steps=1))
    lr = 0.01
    groups = {g["name"]: g for g in ktrain.param_groups(model, lr, weight_decay=0.02)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    # every trainable parameter exactly once (the tied head weight is the embedding's)
    all_members = [n for m in members.values() for n in m]
    assert sorted(all_members) == sorted(n for n, _ in model.named_parameters())
    leaf = lambda n: n.rsplit(".", 1)[-1]  # noqa: E731
    assert {leaf(n) for n in members["logit"]} == {"decay_logit", "alpha_logit", "gate_logit", "eta_logit"}
    assert members["emb"] == {"emb.weight", "emb_proj.weight"}
    assert all(leaf(n) == "bias" for n in members["bias"]) and len(members["bias"]) > 5
    assert all(leaf(n) == "scale" for n in members["norm"]) and "norm.scale" in members["norm"]
    assert {"stack.shared_kernel"} <= members["core"]
    assert any(n.endswith(".u") for n in members["core"]) and any(n.endswith("proj.weight") for n in members["core"])
    expect = {"core": (1.0, 0.02), "logit": (0.5, 0.0), "bias": (0.5, 0.0), "norm": (0.5, 0.0), "emb": (0.75, 0.0)}
    for k, (mult, wd) in expect.items():
        assert groups[k]["lr"] == pytest.approx(lr * mult) and groups[k]["weight_decay"] == wd, k
    simple = {g["name"]: g for g in ktrain.param_groups(model, lr, 0.02, mode="simple")}
    assert all(p.dim() >= 2 for p in simple["decay"]["params"]) and simple["decay"]["weight_decay"] == 0.02
    assert all(p.dim() < 2 for p in simple["no_decay"]["params"]) and simple["no_decay"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="mode"):
        ktrain.param_groups(model, lr, mode="fancy")


def test_optimizer_state_round_trips_by_name():
    torch.manual_seed(0)
    model = KStackLM(KStackConfig(vocab_size=7, d_model=8, n_k2=1, rank=2, kernel_size=3))
    args = ktrain.parse_args(["--lr", "1e-2"])
    opt = ktrain.make_optimizer(model, args, torch.device("cpu"))
    model(torch.randint(0, 7, (2, 9)), torch.randint(0, 7, (2, 9))).backward()
    opt.step()
    state = ktrain.optimizer_state(model, opt)
    assert all(isinstance(k, str) for k in state["state"])
    opt2 = ktrain.make_optimizer(model, args, torch.device("cpu"))
    ktrain.load_optimizer_state(model, opt2, state)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[p][key])
    other = KStackLM(KStackConfig(vocab_size=7, d_model=8, n_k2=2, rank=2, kernel_size=3))
    with pytest.raises(ValueError, match="not in this model"):
        ktrain.load_optimizer_state(other, ktrain.make_optimizer(other, args, torch.device("cpu")),
                                    {"state": {"nope.weight": {}}, "param_groups": [{"params": ["nope.weight"]}]})


def test_preset_sets_defaults_and_flags_override():
    args = ktrain.parse_args(["--preset", "shakespeare-char-v2", "--steps", "7"])
    assert (args.d_model, args.n_k2, args.rank, args.window, args.kernel_size) == (64, 6, 4, 2048, 8)
    assert (args.gamma_min, args.alpha_cap, args.batch_size, args.lr, args.warmup_steps) == (0.05, 1.0, 32, 1e-2, 3000)
    assert args.steps == 7 and "steps" in args.explicit and "d_model" not in args.explicit
    cfg = ktrain.model_config(args, vocab_size=65)
    assert (cfg.d_model, cfg.n_k2, cfg.rank, cfg.window, cfg.shared_kernel) == (64, 6, 4, 2048, True)
    wt = ktrain.model_config(ktrain.parse_args(["--preset", "paper-wikitext2-sp8192"]), vocab_size=8192)
    assert (wt.d_model, wt.emb_dim, wt.rank, wt.window, wt.head) == (256, 64, 32, 512, "adaptive")
    assert list(wt.adaptive_cutoffs) == [1024, 4096] and (wt.gamma_min, wt.gamma_max) == (0.15, 0.995)
    assert wt.head_dropout == 0.3                                          # its sweep's --head-dropout
    ts = ktrain.model_config(ktrain.parse_args(["--preset", "paper-shakespeare-char"]), vocab_size=65)
    assert (ts.head, ts.head_mult, ts.head_dropout, ts.refine_steps, ts.alpha_cap) == ("gelu", 1, 0.15, 1, 0.8)


# ------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("run") / "r"
    code = ktrain.main(["--text", text_file, "--out", out, *TINY, "--steps", "60", "--eval-interval", "20",
                        "--log-interval", "1", "--seed", "3"])
    assert code == 0
    return out


def test_end_to_end_loss_falls_checkpoint_loads_eval_matches(trained_run, text_file):
    log = read_log(trained_run)
    evals = [r for r in log if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40, 60]
    losses = train_losses(trained_run)
    assert sorted(losses) == list(range(1, 61))
    vocab = log[0]["vocab_size"]
    assert losses[1] > math.log(vocab) - 0.5                      # starts near uniform
    assert sum(list(losses.values())[-10:]) / 10 < losses[1] - 0.8  # and learns
    assert evals[-1]["val_ce"] < evals[0]["val_ce"] < math.log(vocab)
    model, tok = load_checkpoint(trained_run / "last")
    _, valid = split_text(Path(text_file).read_text(encoding="utf-8"), 0.1)
    res = evaluate(model, encode(tok, valid), window=32, batch_size=16)
    assert res["val_ce"] == pytest.approx(evals[-1]["val_ce"], rel=1e-6)
    best = min(evals, key=lambda r: r["val_ce"])
    model_b, _ = load_checkpoint(trained_run / "best")
    assert evaluate(model_b, encode(tok, valid), window=32, batch_size=16)["val_ce"] == pytest.approx(best["val_ce"],
                                                                                                        rel=1e-6)
    state = json.loads((trained_run / "last" / "trainer.json").read_text())
    assert state["step"] == 60 and state["skipped_steps"] == 0 and state["sampler"]["step"] == 60


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def tb_scalars(logdir) -> dict:
    """tag -> [(step, value)] as TensorBoard's own reader shows them."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator(
        str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def log_scalars(out: Path) -> dict:
    """The same, from log.jsonl (float32, as TensorBoard stores them)."""
    want = {}
    for rec in read_log(out):
        for tag, v in kcurves.tensorboard_scalars(rec).items():
            want.setdefault(tag, []).append((rec["step"], f32(v)))
    return want


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_tensorboard_events_hold_the_log_and_the_grad_norm_is_the_gradients(trained_run, text_file):
    got = tb_scalars(trained_run / "tensorboard")
    assert set(got) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/ce", "val/ppl",
                        "val/best_ppl"}
    assert got == log_scalars(trained_run)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 61)) and [s for s, _ in got["val/ce"]] == [20, 40, 60]
    assert all(v > 0 for _, v in got["train/tokens_per_s"])
    assert png_size(trained_run / "curves.png") == (1100, 420)
    # the logged gradient norm of update 1 is the norm of the gradient of its batch (before clipping)
    log = read_log(trained_run)
    cfg, args = log[0]["config"], log[0]["args"]
    torch.manual_seed(args["seed"])
    model = KStackLM(KStackConfig(**cfg))
    train, _ = split_text(Path(text_file).read_text(encoding="utf-8"), 0.1)
    from kop_triton.data import BatchSampler
    _, tok = load_checkpoint(trained_run / "last")
    x, y = BatchSampler(encode(tok, train), cfg["window"], args["batch_size"], args["seed"]).batch(0)
    loss = model(x, y)
    loss.backward()
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    first = [r for r in log if r["event"] == "train"][0]
    assert first["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert first["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 1.0   # clipped afterwards, logged before


def test_generate_cli(trained_run, capsys):
    from kop_triton import generate

    argv = ["--checkpoint", str(trained_run / "best"), "--prompt", "the ", "--max-new-tokens", "40", "--seed", "1"]
    assert generate.main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("the ") and len(first.rstrip("\n")) >= 4 + 20
    assert generate.main(argv) == 0
    assert capsys.readouterr().out == first                   # seeded
    assert generate.main(["--checkpoint", str(trained_run / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, text_file, monkeypatch):
    calls = {"n": 0}
    orig = KStackLM.forward

    def flaky(self, ids, targets=None):
        out = orig(self, ids, targets)
        calls["n"] += 1
        if targets is not None and self.training and calls["n"] in (3, 5):
            return out * float("nan")
        return out

    monkeypatch.setattr(KStackLM, "forward", flaky)
    out = tmp_path / "r"
    assert ktrain.main(["--text", text_file, "--out", out, *TINY, "--steps", "8", "--eval-interval", "8",
                        "--log-interval", "1", "--max-eval-tokens", "200"]) == 0
    state = json.loads((out / "last" / "trainer.json").read_text())
    assert state["skipped_steps"] == 2
    model, _ = load_checkpoint(out / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["skipped_steps"] for r in read_log(out) if r["event"] == "train"] == [0, 0, 1, 1, 2, 2, 2, 2]


# ------------------------------------------------------------------------------- faults

def test_sigterm_then_resume_reproduces_the_uninterrupted_losses(tmp_path, text_file):
    common = ["--text", text_file, *TINY, "--steps", "40", "--eval-interval", "15", "--log-interval", "1",
              "--emb-dropout", "0.1", "--mlp-dropout", "0.1", "--residual-dropout", "0.1", "--seed", "5",
              "--max-eval-tokens", "400"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = run_cli([*common, "--out", ref])
    assert r.returncode == 0, r.stderr

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "kop_triton.train", *map(str, common), "--out", str(cut)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = cut / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill mid-run: after step 8, well before 40
        if log.exists() and sum('"train"' in line for line in log.read_text().splitlines()) >= 8:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = json.loads((cut / "last" / "trainer.json").read_text())["step"]
    assert 8 <= stopped < 40, err
    assert "stopped by SIGTERM" in err

    r = run_cli(["--out", cut, "--resume"])
    assert r.returncode == 0, r.stderr
    a, b = train_losses(ref), train_losses(cut)
    assert sorted(b) == list(range(1, 41))
    assert [a[s] for s in range(1, 41)] == [b[s] for s in range(1, 41)]  # bit-for-bit, step for step
    ev_a = [(x["step"], x["val_ce"]) for x in read_log(ref) if x["event"] == "eval"]
    ev_b = [(x["step"], x["val_ce"]) for x in read_log(cut) if x["event"] == "eval"]
    assert ev_a == ev_b


def test_resume_adds_event_files_and_every_step_shows_once(tmp_path, text_file, monkeypatch):
    """A run to step 4, resumed to 8; then, as if killed after logging step 8 but before its
    checkpoint, resumed again from the step-4 checkpoint: the earlier event files stay as they were,
    TensorBoard and curves.png show every step once, with the values of the (truncated) log.jsonl;
    curves.png is redrawn, a valid PNG, at every evaluation."""
    drawn = []
    real_plot = kcurves.plot_run

    def spy(run_dir, out=None):
        path = real_plot(run_dir, out)
        drawn.append(([r["step"] for r in read_log(Path(run_dir)) if r["event"] == "eval"][-1], png_size(path)))
        return path

    monkeypatch.setattr(kcurves, "plot_run", spy)
    out = tmp_path / "r"
    base = ["--text", text_file, *TINY, "--eval-interval", "4", "--log-interval", "1", "--max-eval-tokens", "300"]
    assert ktrain.main([*base, "--out", out, "--steps", "4"]) == 0
    shutil.copytree(out / "last", tmp_path / "last-4")
    assert ktrain.main(["--out", out, "--resume", "--steps", "8"]) == 0
    tb_dir = out / "tensorboard"
    before = {p.name: p.read_bytes() for p in tb_dir.iterdir()}
    assert len(before) == 2
    first_pass = log_scalars(out)
    shutil.rmtree(out / "last")
    shutil.copytree(tmp_path / "last-4", out / "last")
    assert ktrain.main(["--out", out, "--resume", "--steps", "8"]) == 0
    files = sorted(tb_dir.iterdir())
    assert len(files) == 3 and {p.name: p.read_bytes() for p in files[:2]} == before
    got = tb_scalars(tb_dir)
    assert got == log_scalars(out)
    timed = "train/tokens_per_s"                                   # a measurement; everything else is deterministic
    assert {k: v for k, v in got.items() if k != timed} == {k: v for k, v in first_pass.items() if k != timed}
    for tag, pts in got.items():
        steps = [s for s, _ in pts]
        assert steps == sorted(set(steps)), tag                    # no step twice
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))
    assert drawn == [(4, (1100, 420)), (8, (1100, 420)), (8, (1100, 420))]


def test_eta_clock_and_duration_format():
    c = ktrain.EtaClock(total=100, eval_interval=30, tokens_per_step=10)
    assert c.eta_s(0) is None
    for _ in range(10):
        c.stepped(0.5)
    assert c.eta_s(10) == pytest.approx(90 * 0.5)                # no evaluation timed yet
    assert c.window_tokens_per_s() == pytest.approx(100 / 5.0)
    c.stepped(1.0)
    assert c.window_tokens_per_s() == pytest.approx(10.0)        # the window restarts at every call
    c.evaluated(4.0)
    assert [c.evals_left(s) for s in (0, 29, 30, 89, 90, 99, 100)] == [4, 4, 3, 2, 1, 1, 0]   # 30, 60, 90, 100
    assert c.eta_s(11) == pytest.approx(89 * 6.0 / 11 + 4 * 4.0)          # 6 s over 11 steps; 4 evaluations
    assert ktrain.EtaClock(100, 50, 1).evals_left(0) == 2 and ktrain.EtaClock(100, 50, 1).evals_left(50) == 1
    assert [ktrain.format_duration(x) for x in (3725, 754, 9.4, 0, None, float("inf"))] == \
        ["1h02m", "12m34s", "9s", "0s", "?", "?"]


def test_progress_lines_and_bar_show_the_eta(tmp_path, text_file, capsys, monkeypatch):
    monkeypatch.setattr(ktrain, "PROGRESS_LINE_EVERY_S", 0.0)
    base = ["--text", text_file, *TINY, "--steps", "6", "--eval-interval", "3", "--max-eval-tokens", "200"]
    assert ktrain.main([*base, "--out", tmp_path / "a"]) == 0                         # TINY has --no-progress
    err = capsys.readouterr().err.splitlines()
    lines = [x for x in err if x.startswith("step ")]
    assert [x.split(":")[0] for x in lines] == ["step 1/6", "step 2/6", "step 3/6", "step 3/6", "step 4/6", "step 5/6",
                                                "step 6/6"]
    assert all(re.search(r"\| ETA (\d+h\d\dm|\d+m\d\ds|\d+s)$", x) for x in lines[:-1]), lines
    assert "val_ce" in lines[3] and "val_ce" in lines[-1] and "ETA" not in lines[-1]    # none after the last step
    assert ktrain.main([*base, "--out", tmp_path / "b", "--progress"]) == 0
    assert re.search(r"eta=(\d+h\d\dm|\d+m\d\ds|\d+s)", capsys.readouterr().err)


def test_plot_flag_draws_an_existing_run_and_refuses_other_flags(trained_run, tmp_path, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(trained_run / "log.jsonl", copy / "log.jsonl")
    assert ktrain.main(["--plot", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "curves.png") and png_size(copy / "curves.png") == (1100, 420)
    assert ktrain.main(["--plot", str(tmp_path / "nope")]) == 2
    assert "log.jsonl not found" in _one_error_line(capsys)
    assert ktrain.main(["--plot", str(copy), "--steps", "3"]) == 2
    line = _one_error_line(capsys)
    assert "--plot only draws" in line and line.endswith("drop --steps"), line


def test_corrupt_checkpoint_is_reported_not_used(tmp_path, text_file, capsys):
    out = tmp_path / "r"
    base = ["--text", str(text_file), *TINY, "--max-eval-tokens", "200", "--eval-interval", "3"]
    assert ktrain.main([*base, "--out", str(out), "--steps", "3"]) == 0
    capsys.readouterr()
    for name, pattern in (("optimizer.pt", "checksum"), ("rng.pt", "checksum"), ("model.safetensors", "SHA-256"),
                          ("trainer.json", "corrupt")):
        victim = out / "last" / name
        good = victim.read_bytes()
        victim.write_bytes(good[: len(good) // 2] + bytes([good[len(good) // 2] ^ 0xFF]) + good[len(good) // 2 + 1:])
        assert ktrain.main(["--out", str(out), "--resume", "--steps", "5"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and pattern in err[0] and "error" in err[0], (name, err)
        victim.write_bytes(good)
    assert ktrain.main(["--out", str(out), "--resume", "--steps", "4"]) == 0   # intact again: resumes


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--text", "/no/such/file.txt"], "not found"),
    (["--tokenizer", "wordpiece"], "invalid choice"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--d-model", "-4"], "--d-model must be an int >= 1, got -4"),
    (["--kernel-size", "5000"], "--kernel-size must be an int in [1, 4096], got 5000"),
    (["--batch-size", "abc"], "invalid int value"),
    (["--resume"], "no checkpoint"),
    (["--preset", "gpt5"], "invalid choice"),
    (["--lr-floor", "1", "--lr", "0.1"], "lr-floor"),
    (["--window", "100000"], "window"),
])
def test_bad_flags_give_one_clear_line(argv, needle, tmp_path, text_file, capsys):
    full = ["--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    if "--text" not in argv and "--dataset" not in argv:
        full += ["--text", str(text_file)]
    try:
        code = ktrain.main(full + argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert "Traceback" not in err[0]


def test_refuses_to_overwrite_a_run_without_resume(trained_run, capsys, text_file):
    assert ktrain.main(["--text", str(text_file), "--out", str(trained_run), *TINY, "--steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------- distributed

DIST_COMMON = [*TINY, "--log-interval", "1", "--eval-interval", "6", "--seed", "11", "--max-eval-tokens", "600"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, text_file):
    one = tmp_path_factory.mktemp("one") / "r"
    r = run_cli(["--text", text_file, *DIST_COMMON, "--steps", "12", "--out", one])
    assert r.returncode == 0, r.stderr
    return one


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process_and_resumes_on_another_world_size(mode, tmp_path, text_file,
                                                                                 single_process_run):
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kop_triton.train", "--text", str(text_file), *DIST_COMMON, "--steps", "6", "--out", str(two)]
    cmd += ["--fsdp"] if mode == "fsdp" else []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: nothing left behind
        _, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s: {err[-2000:]}")
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((two / "last" / "trainer.json").read_text())["world_size"] == 2
    r = run_cli(["--out", two, "--resume", "--steps", "12"])        # resume the 2-process run on 1 process
    assert r.returncode == 0, r.stderr
    a, b = train_losses(single_process_run), train_losses(two)
    assert sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert b[s] == pytest.approx(a[s], rel=2e-5, abs=2e-5), (s, a[s], b[s])
    ev_a = [x["val_ce"] for x in read_log(single_process_run) if x["event"] == "eval"]
    ev_b = [x["val_ce"] for x in read_log(two) if x["event"] == "eval"]
    assert len(ev_a) == len(ev_b) == 2
    assert ev_b == pytest.approx(ev_a, rel=2e-5)


def test_wikitext2_layout_with_sentencepiece(tmp_path):
    root = tmp_path / "data" / "wikitext-2"
    root.mkdir(parents=True)
    for i, split in enumerate(("train", "valid", "test")):
        (root / f"{split}.txt").write_text(make_text(40_000 if split == "train" else 6_000, seed=i), encoding="utf-8")
    out = tmp_path / "r"
    code = ktrain.main(["--dataset", "wikitext2", "--data-dir", tmp_path / "data", "--tokenizer", "sentencepiece",
                        "--sp-vocab-size", "80", "--out", out, *TINY, "--steps", "12", "--eval-interval", "12",
                        "--log-interval", "1"])
    assert code == 0
    cached = list((root / "tokenizers").glob("*.model"))
    assert len(cached) == 1                                     # trained once, cached next to the data
    model, tok = load_checkpoint(out / "last")
    assert tok.kind == "sentencepiece" and tok.vocab_size == read_log(out)[0]["vocab_size"] <= 80
    valid = (root / "valid.txt").read_text(encoding="utf-8")
    from kop_triton.tokenizers import SentencePieceTokenizer
    assert tok.encode(valid) == SentencePieceTokenizer(str(cached[0])).encode(valid)
    ev = [r for r in read_log(out) if r["event"] == "eval"][-1]
    res = evaluate(model, encode(tok, valid), window=32, batch_size=16)
    assert res["val_ce"] == pytest.approx(ev["val_ce"], rel=1e-6) and res["tokens"] == ev["val_tokens"]
    losses = train_losses(out)
    assert losses[12] < losses[1]


def test_paper_wikitext2_preset_runs_end_to_end_on_a_generated_corpus(tmp_path):
    """Smoke test of --preset paper-wikitext2-sp8192 (its training split is not on these machines;
    the README says how to run the real thing): a generated corpus in the WikiText-2 layout, the
    preset's model and recipe, changed only where a small corpus and a CPU test need it: 3 steps of
    2 windows, and a SentencePiece vocabulary of 600 with adaptive cutoffs inside it (a corpus this
    small gives fewer than the 4,097 pieces the preset's cutoffs 1024,4096 need)."""
    root = tmp_path / "data" / "wikitext-2"
    root.mkdir(parents=True)
    for i, split in enumerate(("train", "valid", "test")):
        (root / f"{split}.txt").write_text(make_wiki_text(80_000 if split == "train" else 12_000, seed=i),
                                           encoding="utf-8")
    out = tmp_path / "r"
    assert ktrain.main(["--preset", "paper-wikitext2-sp8192", "--data-dir", tmp_path / "data", "--out", out,
                        "--steps", "3", "--batch-size", "2", "--eval-interval", "3", "--log-interval", "1",
                        "--sp-vocab-size", "600", "--adaptive-cutoffs", "150,400", "--max-eval-tokens", "1100",
                        "--no-progress", "--device", "cpu"]) == 0
    log = read_log(out)
    cfg = log[0]["config"]
    preset = ktrain.get_preset("paper-wikitext2-sp8192")
    for key in ("d_model", "emb_dim", "n_k2", "rank", "window", "head", "adaptive_div_value", "shared_kernel",
                "kernel_size", "refine_steps", "alpha_cap", "gamma_min", "gamma_max", "emb_dropout", "mlp_dropout",
                "residual_dropout", "head_dropout"):
        assert cfg[key] == preset[key], key
    assert log[0]["args"]["optimizer_groups"] == "grouped" and log[0]["args"]["tokenizer"] == "sentencepiece"
    assert cfg["adaptive_cutoffs"] == [150, 400] and 400 < cfg["vocab_size"] <= 600
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    model, tok = load_checkpoint(out / "last")
    ev = [r for r in log if r["event"] == "eval"][-1]
    res = evaluate(model, encode(tok, (root / "valid.txt").read_text(encoding="utf-8"))[:1101], window=512,
                   batch_size=8)
    assert res["val_ce"] == pytest.approx(ev["val_ce"], rel=1e-6) and ev["val_tokens"] == 1024 == res["tokens"]


def test_sigint_saves_and_resume_continues_in_process(tmp_path, text_file, monkeypatch, capsys):
    base = ["--text", text_file, *TINY, "--steps", "8", "--eval-interval", "4", "--log-interval", "1",
            "--max-eval-tokens", "300", "--mlp-dropout", "0.2"]
    assert ktrain.main([*base, "--out", tmp_path / "ref"]) == 0
    from kop_triton.data import BatchSampler
    orig = BatchSampler.batch

    def interrupting(self, step, rank=0, world=1):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; the step finishes, then it stops
        return orig(self, step, rank, world)

    monkeypatch.setattr(BatchSampler, "batch", interrupting)
    before = signal.getsignal(signal.SIGINT)
    assert ktrain.main([*base, "--out", tmp_path / "cut"]) == 128 + signal.SIGINT
    assert "stopped by SIGINT at step 3" in capsys.readouterr().err
    assert json.loads((tmp_path / "cut" / "last" / "trainer.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back
    monkeypatch.setattr(BatchSampler, "batch", orig)
    assert ktrain.main(["--out", tmp_path / "cut", "--resume"]) == 0
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "ref")


# ------------------------------------------------------------------------------- ROSA

def test_rosa_run_trains_rho_and_scores_as_eval(tmp_path, text_file):
    out = tmp_path / "rosa"
    assert ktrain.main(["--text", text_file, "--out", out, *TINY, "--steps", "8", "--eval-interval", "8",
                        "--log-interval", "1", "--max-eval-tokens", "300", "--rosa", "reference",
                        "--rosa-layers", "1"]) == 0
    log = read_log(out)
    assert (log[0]["config"]["rosa"], log[0]["config"]["rosa_layers"]) == ("reference", [1])
    model, tok = load_checkpoint(out / "last")
    b0, b1 = model.stack.k2_blocks()
    from kop_triton.modules import ROSA_RHO_INIT
    assert b0.rho_logit is None and abs(b1.rho_logit.item() - ROSA_RHO_INIT) > 1e-5   # trained
    _, valid = split_text(Path(text_file).read_text(encoding="utf-8"), 0.1)
    res = evaluate(model, encode(tok, valid)[:301], window=32, batch_size=16)
    assert res["val_ce"] == pytest.approx([r for r in log if r["event"] == "eval"][-1]["val_ce"], rel=1e-6)


def test_rosa_prefetcher_gives_the_sampler_batches(text_file):
    from kop_triton.data import BatchSampler
    from kop_triton.distributed import DistInfo
    ids = torch.randint(0, 9, (5000,), generator=torch.Generator().manual_seed(0))
    s = BatchSampler(ids, 64, 4, seed=2, rosa="exact", vocab_size=9)
    info = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    pf = ktrain.BatchPrefetcher(s, info)
    assert pf.enabled
    for step in (0, 1, 2, 5, 6):          # in order, and after a jump
        got, want = pf.get(step, 7), s.batch(step)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    pf.close()
    assert not ktrain.BatchPrefetcher(BatchSampler(ids, 64, 4, seed=2), info).enabled


def test_rosa_preset_is_the_v2_rosa_model():
    args = ktrain.parse_args(["--preset", "shakespeare-char-v2-rosa"])
    cfg = ktrain.model_config(args, 65)
    assert (cfg.rosa, cfg.rosa_layers, cfg.window, cfg.n_k2) == ("reference", None, 2048, 6)
    assert KStackLM(cfg).num_parameters() == 178_692          # the v2 README's ROSA checkpoints
    assert ktrain.model_config(ktrain.parse_args(["--rosa-layers", "0,2", "--rosa", "exact"]), 9).rosa_layers == [0, 2]


# ------------------------------------------------------------------------------- what a new user trips over

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kop-train: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_resume_refuses_changed_flags_and_a_finished_run_prints_no_garbage(tmp_path, text_file, capsys):
    out = tmp_path / "r"
    base = ["--text", str(text_file), *TINY, "--max-eval-tokens", "200", "--eval-interval", "3"]
    assert ktrain.main([*base, "--out", str(out), "--steps", "3"]) == 0
    capsys.readouterr()
    before = (out / "last" / "trainer.json").read_bytes()
    # flags the checkpoint fixes, given with other values: refused, every one named with both values
    assert ktrain.main(["--out", str(out), "--resume", "--steps", "5", "--d-model", "128", "--lr", "0.5",
                        "--batch-size", "4"]) == 2
    line = _one_error_line(capsys)
    for needle in ("--d-model 128 (the run has 24)", "--lr 0.5 (the run has 0.01)", "--batch-size 4 (the run has 8)",
                   "--steps"):
        assert needle in line, line
    assert (out / "last" / "trainer.json").read_bytes() == before          # nothing touched
    # the same values as the run's are fine (a re-typed command line), and --steps may change
    assert ktrain.main(["--out", str(out), "--resume", "--steps", "4", "--d-model", "24", "--batch-size", "8"]) == 0
    assert json.loads((out / "last" / "trainer.json").read_text())["step"] == 4
    capsys.readouterr()
    # a resume at or past --steps trains nothing and says so; no best val_ppl before any finite evaluation
    assert ktrain.main(["--out", str(out), "--resume", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "already at step 4 of --steps 2: nothing to train" in err and "Traceback" not in err, err
    state = json.loads((out / "last" / "trainer.json").read_text())
    state["best_val_ce"] = float("inf")                                     # as after a stop before any evaluation
    (out / "last" / "trainer.json").write_text(json.dumps(state))
    assert ktrain.main(["--out", str(out), "--resume", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "best val_ppl n/a" in err and "e+" not in err and "5184705528587072045056" not in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--max-eval-tokens", "0"], "--max-eval-tokens must be >= 1, got 0 (leave it out to evaluate on every"),
    (["--max-eval-tokens", "-5"], "--max-eval-tokens must be >= 1"),
    (["--eval-window", "0"], "--eval-window must be >= 1"),
    (["--fsdp"], "--fsdp shards the model over the processes of a torchrun launch"),
    (["--gamma-min", "2"], "gamma_min"),
])
def test_flags_a_new_user_gets_wrong(argv, needle, tmp_path, text_file, capsys):
    out = tmp_path / "o"
    assert ktrain.main(["--text", str(text_file), "--out", str(out), *TINY, "--steps", "2", *argv]) == 2
    assert needle in _one_error_line(capsys)
    assert not (out / "last").exists()


def test_out_naming_a_file_is_one_clear_line(tmp_path, text_file, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for extra in ([], ["--resume"]):
        assert ktrain.main(["--text", str(text_file), "--out", str(f), *TINY, "--steps", "2", *extra]) == 2
        assert f"--out {f} is a file" in _one_error_line(capsys)
    assert f.read_text() == "keep me"


def test_config_errors_are_a_type_not_a_file_name():
    """A ValueError of the model code while the run is set up is a ConfigError; the same error from
    inside a step is a bug and keeps its traceback."""
    with pytest.raises(ktrain.ConfigError, match="d_model"):
        with ktrain.config_errors():
            KStackConfig(vocab_size=5, d_model=-1)
    assert issubclass(ktrain.ConfigError, ktrain.UsageError)
    with pytest.raises(ValueError):
        KStackConfig(vocab_size=5, d_model=-1)


def test_model_flags_come_from_kstackconfig():
    """One definition of the model's fields: kop-train's model flags (names, types, help) are derived
    from KStackConfig's dataclass fields, as the HF config's are (tests/test_hf_correctness.py)."""
    import dataclasses
    from kop_triton.model import KStackConfig
    fields = {f.name: f for f in dataclasses.fields(KStackConfig)}
    assert set(ktrain.MODEL_FLAGS) == set(fields) - {"vocab_size", "shared_kernel"}
    for name, (typ, help_) in ktrain.MODEL_FLAGS.items():
        assert help_ == fields[name].metadata["help"]
    helptext = ktrain.build_parser().format_help()
    for name in fields:
        if name != "vocab_size":
            assert "--" + name.replace("_", "-") in helptext, name
    args = ktrain.parse_args(["--emb-dim", "8", "--rosa-layers", "0,1", "--no-shared-kernel", "--rosa", "exact"])
    cfg = ktrain.model_config(args, 11)
    assert cfg.emb_dim == 8 and cfg.rosa_layers == [0, 1] and cfg.shared_kernel is False
