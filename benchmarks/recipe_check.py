"""The training recipe of ``kop-train --preset paper-shakespeare-char`` checked against the reference
implementation's own trainer (issue 24): the same configuration, seed and data through both for the
first steps of the 3,500-step run, then a comparison item by item.

    # the reference at the commit of its Tiny Shakespeare seed sweep (git archive, never committed here)
    git --git-dir REF.git archive 8ce45ce k_language_model | tar -x -C /tmp/kref
    python -m benchmarks.recipe_check reference --reference-dir /tmp/kref --reference-commit 8ce45ce \\
        --data-path ../shared/data/tinyshakespeare/input.txt --json OUT/reference.json
    python -m benchmarks.recipe_check ours --data-path ../shared/data/tinyshakespeare/input.txt --json OUT/ours.json
    python -m benchmarks.recipe_check compare --dir OUT          # OUT/curves.png, OUT/comparison.json

``reference`` runs the reference's ``train_app.main`` (its CLI, its ``train_model`` loop, its data
loader) in this process with the flags of its seed sweep (``configs/colab_seed_sweep.sh`` at the
sweep's commit; ``--compile`` and ``--fused-adamw`` are CUDA-only and left out, the decay path is
``--decay-impl``) and ``--steps 3500``, and stops it after ``--stop-after`` training steps, when its
loop asks for the next batch. Its decay path: ``--decay-impl mask`` (what the sweep ran: an
O(W^2 R D) einsum, 36 to 43 s for one forward and backward on one thread of the shared dev CPU) or
``block`` are its own; ``scan`` (default) runs the same K2 layer with the decayed sum computed by this
project's chunked scan (``kop_triton.decayed_scan``: 4.1 s per whole training step, median, same
machine), after checking on one of the run's layers that its output and every gradient equal those
of the reference's own ``mask`` forward (the differences are recorded); every module is called in
the reference's order, so the dropout masks and the data batches (one global RNG) are those of an
unpatched run. Nothing of the reference is changed: the run is observed by wrapping what its trainer
calls (``torch.optim.AdamW`` and ``LambdaLR`` to read the parameter groups, the learning rates of
every step and the schedule function itself; ``clip_grad_norm_`` for the gradient norm;
``F.cross_entropy`` of its trainer module for the training loss; ``eval_deterministic`` for the
validation CE). The schedule recorded is the reference's own ``lr_lambda`` evaluated at every step
of the 3,500.

``ours`` runs ``kop_triton.train.main`` with ``--preset paper-shakespeare-char`` the same way (the
full 3,500-step schedule, stopped after ``--stop-after`` steps) and reads its ``log.jsonl``.

``compare`` writes ``comparison.json`` (every item of the table, measured) and ``curves.png`` (both
training-loss curves and validation CE over the steps run; below, both gradient norms).  The
markdown table beside the results (``README.md`` of the results folder) is written by hand from
``comparison.json``.

The reference is not a dependency of this project: its package is imported only from the directory
given with ``--reference-dir``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

# The seed sweep behind RESULTS_V1.md's Tiny Shakespeare table (mean val PPL 4.43), as
# configs/colab_seed_sweep.sh has it at the reference's commits d25bb5e..8ce45ce (2026-03-13), less
# --compile / --compile-mode / --fused-adamw (CUDA-only speed flags) and --decay-impl (chosen here).
REF_SWEEP_FLAGS = ["--d-model", "128", "--head-mode", "gelu", "--head-mult", "1", "--n-k2", "6",
                   "--refine-steps", "1", "--rank", "32", "--window", "256", "--optimizer-mode", "simple",
                   "--batch-size", "64", "--steps", "3500", "--eval-interval", "250", "--lr", "10e-3",
                   "--warmup-steps", "2000", "--alpha-cap", "0.8", "--lr-floor", "3.5e-04",
                   "--head-dropout", "0.15"]
PRESET = "paper-shakespeare-char"
TOTAL_STEPS = 3500


class StopRun(Exception):
    """Raised from the batch loader when the observed run has done the steps asked for."""


def _flag_value(flags, name, cast=float):
    return cast(flags[flags.index(name) + 1])


def _with(flags, name, value):
    out = list(flags)
    if name in out:
        out[out.index(name) + 1] = str(value)
    else:
        out += [name, str(value)]
    return out


def _machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def _dropouts(model) -> list:
    return [[name, float(m.p)] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Dropout) and m.p > 0]


def _groups(optimizer, names: dict) -> list:
    out = []
    for g in optimizer.param_groups:
        members = [names.get(id(p), "?") for p in g["params"]]
        out.append({"name": g.get("name", "?"), "n_tensors": len(members),
                    "n_params": int(sum(p.numel() for p in g["params"])), "lr": float(g["lr"]),
                    "weight_decay": float(g["weight_decay"]), "betas": list(g["betas"]), "eps": float(g["eps"]),
                    "members": sorted(members)})
    return out


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ reference

def run_reference(args) -> dict:
    ref_dir = os.path.abspath(args.reference_dir)
    if not os.path.isfile(os.path.join(ref_dir, "k_language_model", "trainer.py")):
        raise SystemExit(f"recipe_check: --reference-dir {ref_dir} holds no k_language_model/trainer.py (extract the "
                         f"reference there, e.g. git archive 8ce45ce k_language_model | tar -x -C DIR)")
    sys.path.insert(0, ref_dir)
    from k_language_model import data as rdata, train_app as rapp, trainer as rtrainer

    data_path = Path(args.data_path).resolve()
    rdata.DATA_PATH = data_path               # its loader reads this module global (no download)
    flags = _with(_with(REF_SWEEP_FLAGS, "--seed", args.seed), "--eval-interval", args.eval_interval)
    flags += ["--decay-impl", "mask" if args.decay_impl == "scan" else args.decay_impl]
    doc = {"kind": "reference", "reference_dir": ref_dir, "reference_commit": args.reference_commit,
           "argv": flags, "data": str(data_path), "stop_after": args.stop_after, "machine": _machine(),
           "steps": [], "evals": [], "status": "running"}
    out = Path(args.json)
    seen = {"model": None, "opt": None, "sched": None, "t0": time.perf_counter(), "t_step": None}
    cur = {}

    real_adamw, real_lambda, real_clip = torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, \
        torch.nn.utils.clip_grad_norm_
    real_batch, real_eval, real_train_model = rtrainer.get_batch, rtrainer.eval_deterministic, rapp.train_model
    real_F = rtrainer.F

    class AdamW(real_adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["opt"] = self

        def step(self, *a, **k):
            cur["lrs"] = [float(g["lr"]) for g in self.param_groups]
            return super().step(*a, **k)

    class LambdaLR(real_lambda):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["sched"] = self

    def clip(params, max_norm, *a, **k):
        cur["max_norm"] = float(max_norm)
        norm = real_clip(params, max_norm, *a, **k)
        cur["grad_norm"] = float(norm)
        return norm

    class FShim:
        """The trainer module's ``F``: records the mean (training) cross-entropy."""

        def __getattr__(self, name):
            return getattr(real_F, name)

        @staticmethod
        def cross_entropy(*a, **k):
            loss = real_F.cross_entropy(*a, **k)
            if k.get("reduction", "mean") == "mean":
                cur["loss"] = float(loss.detach())
            return loss

    def flush_step():
        if "loss" in cur:
            now = time.perf_counter()
            rec = {"step": len(doc["steps"]) + 1, "loss": cur["loss"], "lr": cur["lrs"][0], "group_lrs": cur["lrs"],
                   "grad_norm": cur["grad_norm"], "wall_s": round(now - (seen["t_step"] or now), 3)}
            doc["steps"].append(rec)
            cur.clear()
            if rec["step"] % 10 == 0:
                print(f"reference step {rec['step']}: loss {rec['loss']:.4f} lr {rec['lr']:.3e} "
                      f"gnorm {rec['grad_norm']:.3f} ({rec['wall_s']:.1f}s)", file=sys.stderr, flush=True)
                _write(out, doc)

    def get_batch(*a, **k):
        flush_step()
        if "groups" not in doc:
            record_static()
        if len(doc["steps"]) >= args.stop_after:
            raise StopRun
        seen["t_step"] = time.perf_counter()
        return real_batch(*a, **k)

    def record_static():
        """What does not change while it trains: parameters, optimizer groups, dropouts, the schedule
        (its own lr_lambda at every update), the initial mixer quantities."""
        model, opt, sched = seen["model"], seen["opt"], seen["sched"]
        names = {id(p): n for n, p in model.named_parameters()}
        doc["params"] = int(sum(p.numel() for p in model.parameters()))
        doc["groups"] = _groups(opt, names)
        doc["clip_grad_norm"] = float(doc["train_config"]["clip_grad_norm"])
        doc["dropouts"] = _dropouts(model)
        lam = sched.lr_lambdas[0]
        # its loop: training step k (1-based) runs with the lr LambdaLR set before it, lr * lr_lambda(k - 1)
        doc["schedule_factor"] = [lam(s) for s in range(TOTAL_STEPS)]
        with torch.random.fork_rng():
            doc["init"] = reference_init(args)
        _write(out, doc)

    def eval_det(model, data, window, batch_size):
        flush_step()
        t = time.perf_counter()
        ce, ppl = real_eval(model, data, window, batch_size)
        doc["evals"].append({"step": len(doc["steps"]), "val_ce": float(ce), "val_ppl": float(ppl),
                             "window": int(window), "batch_size": int(batch_size),
                             "windows": (len(data) - 1) // int(window), "wall_s": round(time.perf_counter() - t, 3)})
        print(f"reference eval at step {len(doc['steps'])}: val_ce {ce:.4f}", file=sys.stderr, flush=True)
        _write(out, doc)
        return ce, ppl

    def train_model(model, train_data, val_data, cfg, ckpt_path):
        seen["model"] = model
        if args.decay_impl == "scan":
            layers = [m for m in model.modules() if type(m).__name__ == "K2Layer"]
            doc["scan_check"] = check_scan_forward(layers[0])
            print(f"scan forward vs the reference's mask forward: {doc['scan_check']}", file=sys.stderr, flush=True)
            bad = [doc["scan_check"]["input_grad_max_rel_diff"], *doc["scan_check"]["param_grad_max_rel_diff"].values(),
                   doc["scan_check"]["output_max_abs_diff"] / doc["scan_check"]["output_max_abs"]]
            if max(bad) > 1e-4:
                raise SystemExit(f"recipe_check: the scan forward differs from the reference's: {doc['scan_check']}")
            for layer in layers:
                layer.forward = scan_k2_forward.__get__(layer)
        doc["train_tokens"], doc["val_tokens"] = int(train_data.numel()), int(val_data.numel())
        doc["train_config"] = {k: v for k, v in vars(cfg).items()}
        return real_train_model(model, train_data, val_data, cfg, ckpt_path)

    torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, torch.nn.utils.clip_grad_norm_ = AdamW, LambdaLR, clip
    rtrainer.get_batch, rtrainer.eval_deterministic, rapp.train_model, rtrainer.F = get_batch, eval_det, \
        train_model, FShim()
    argv = sys.argv
    sys.argv = ["train.py", *flags]
    try:
        rapp.main()
        doc["status"] = "finished"
    except StopRun:
        doc["status"] = f"stopped after {args.stop_after} steps (as asked)"
    finally:
        sys.argv = argv
        torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, torch.nn.utils.clip_grad_norm_ = \
            real_adamw, real_lambda, real_clip
        rtrainer.get_batch, rtrainer.eval_deterministic, rapp.train_model, rtrainer.F = \
            real_batch, real_eval, real_train_model, real_F
    doc["wall_s"] = round(time.perf_counter() - seen["t0"], 1)
    _write(out, doc)
    return doc


def scan_k2_forward(layer, h):
    """The reference's v1 ``K2Layer.forward`` (commit 8ce45ce) with its decayed sum
    sum_{j<=i} gamma^(i-j) q_i . k_j h_j computed by kop_triton's chunked scan; the same modules,
    called in the same order."""
    import torch.nn.functional as F
    from k_language_model.runtime import GAMMA_FLOOR
    from kop_triton.ops.scan import decayed_scan
    W = h.shape[1]
    h_norm = layer.norm1(h)
    k_base = layer.k_base[:W, :W] * layer.causal_mask[:W, :W] * torch.sigmoid(layer.k_base_gate_logit)
    out = torch.matmul(k_base, h_norm)
    q = F.normalize(h_norm @ layer.u, dim=-1, eps=1e-8)
    k = F.normalize(h_norm @ layer.v, dim=-1, eps=1e-8)
    gamma = GAMMA_FLOOR + (1.0 - GAMMA_FLOOR) * torch.sigmoid(layer.decay_logit)
    alpha = layer.alpha_cap * torch.sigmoid(layer.alpha_logit)
    o, _ = decayed_scan(q, k, h_norm, gamma, backend="chunked")
    out = layer.drop(layer.proj(out + alpha * o))
    h = h + out
    return h + layer.mlp(layer.norm2(h))


def check_scan_forward(layer) -> dict:
    """``scan_k2_forward`` against the layer's own (mask) forward on random input: output and every
    gradient (eval mode, no dropout; a private generator, the global RNG untouched)."""
    import copy
    a, b = copy.deepcopy(layer).eval(), copy.deepcopy(layer).eval()
    a.decay_impl = "mask"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, a.window, a.u.shape[0], generator=g)
    w = torch.randn(h.shape, generator=g)
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    ya, yb = a(ha), scan_k2_forward(b, hb)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    grads = {n: float((pa.grad - pb.grad).abs().max() / pa.grad.abs().max().clamp(min=1e-30))
             for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()) if pa.grad is not None}
    ya, yb = ya.detach(), yb.detach()
    return {"input": [2, a.window, a.u.shape[0]], "output_max_abs_diff": float((ya - yb).abs().max()),
            "output_max_abs": float(ya.abs().max()),
            "input_grad_max_rel_diff": float((ha.grad - hb.grad).abs().max() / ha.grad.abs().max()),
            "param_grad_max_rel_diff": grads}


def reference_init(args) -> dict:
    """The reference's initial mixer quantities (a fresh model built as its CLI builds it, same seed)."""
    from k_language_model.model import KStackModel
    from k_language_model.runtime import GAMMA_FLOOR
    torch.manual_seed(args.seed)
    f = REF_SWEEP_FLAGS
    m = KStackModel(vocab_size=65, window=_flag_value(f, "--window", int), d=_flag_value(f, "--d-model", int),
                    rank=_flag_value(f, "--rank", int), n_k2=_flag_value(f, "--n-k2", int), emb_dropout=0.08,
                    mlp_dropout=0.10, residual_dropout=0.05, head_mode="gelu", head_mult=1, head_dropout=0.15,
                    refine_steps=1, alpha_cap=_flag_value(f, "--alpha-cap"), decay_impl="mask")
    layer = m.k_stack.layers[1]
    gamma = GAMMA_FLOOR + (1 - GAMMA_FLOOR) * torch.sigmoid(layer.decay_logit.detach())
    kb = layer.k_base.detach()
    return {"gamma_min_max": [float(gamma.min()), float(gamma.max())],
            "gate": float(torch.sigmoid(layer.k_base_gate_logit.detach())),
            "alpha": float(layer.alpha_cap * torch.sigmoid(layer.alpha_logit.detach())),
            "alpha_shape": list(layer.alpha_logit.shape),
            "k_base": f"dense causal {tuple(kb.shape)} per K2 layer; row 10, lags 0-3: "
                      f"taps {[round(float(v), 4) for v in kb[10, :11].flip(0)[:4]]}",
            "eta": float(torch.sigmoid(m.eta_logit.detach()))}


# ------------------------------------------------------------------------------------------ ours

def run_ours(args) -> dict:
    from kop_triton import data as kdata, train as ktrain

    data_path = Path(args.data_path).resolve()
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="recipe-ours-"))
    argv = ["--preset", PRESET, "--data-path", str(data_path), "--seed", str(args.seed), "--steps", str(TOTAL_STEPS),
            "--eval-interval", str(args.eval_interval), "--log-interval", "1", "--threads", str(args.threads),
            "--device", "cpu", "--no-progress", "--out", str(run_dir)]
    doc = {"kind": "ours", "argv": argv, "data": str(data_path), "stop_after": args.stop_after,
           "machine": _machine(), "status": "running"}
    seen = {}
    real_opt, real_batch = ktrain.make_optimizer, kdata.BatchSampler.batch

    def make_optimizer(model, a, device):
        seen["model"], seen["args"] = model, a
        seen["opt"] = real_opt(model, a, device)
        return seen["opt"]

    def batch(self, step, rank=0, world=1):
        if step >= args.stop_after:
            raise StopRun
        return real_batch(self, step, rank, world)

    ktrain.make_optimizer, kdata.BatchSampler.batch = make_optimizer, batch
    t0 = time.perf_counter()
    try:
        code = ktrain.main(argv)
        doc["status"] = f"finished with exit code {code}"
    except StopRun:
        doc["status"] = f"stopped after {args.stop_after} steps (as asked)"
    finally:
        ktrain.make_optimizer, kdata.BatchSampler.batch = real_opt, real_batch
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    model, opt, a = seen["model"], seen["opt"], seen["args"]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    doc["steps"] = [{"step": r["step"], "loss": r["loss"], "lr": r["lr"], "grad_norm": r.get("grad_norm"),
                     "skipped_steps": r["skipped_steps"]} for r in log if r["event"] == "train"]
    doc["evals"] = [{"step": r["step"], "val_ce": r["val_ce"], "val_ppl": r["val_ppl"], "window": 256,
                     "windows": r["val_tokens"] // 256} for r in log if r["event"] == "eval"]
    start = log[0]
    doc["train_tokens"], doc["val_tokens"], doc["params"] = start["train_tokens"], start["val_tokens"], start["params"]
    names = {id(p): n for n, p in model.named_parameters()}
    doc["groups"] = _groups(opt, names)
    doc["clip_grad_norm"] = float(a.clip_grad_norm)
    doc["dropouts"] = _dropouts(model)
    doc["schedule_factor"] = [ktrain.lr_factor(s, a.warmup_steps, a.steps, a.lr_floor / a.lr)
                              for s in range(TOTAL_STEPS)]
    doc["eval_batch_size"] = a.eval_batch_size
    torch.manual_seed(args.seed)
    fresh = ktrain.KStackLM(ktrain.model_config(a, 65))
    mixer = fresh.mixers()[0]
    g = mixer.gamma().detach()
    k = mixer.get_kernel().detach()
    doc["init"] = {"gamma_min_max": [float(g.min()), float(g.max())],
                   "gate": float(torch.sigmoid(mixer.gate_logit.detach())),
                   "alpha": float(mixer.alpha().detach().mean()), "alpha_shape": list(mixer.alpha_logit.shape),
                   "k_base": f"causal kernel of {k.numel()} taps shared by all K2 layers, exp(-0.15 lag) normalised; "
                             f"taps {[round(float(v), 4) for v in k[:4]]}",
                   "eta": float(torch.sigmoid(fresh.eta_logit.detach())) if fresh.eta_logit is not None else None}
    _write(Path(args.json), doc)
    return doc


# ------------------------------------------------------------------------------------------ compare

def compare(args) -> dict:
    d = Path(args.dir)
    ref = json.loads((d / "reference.json").read_text())
    ours = json.loads((d / "ours.json").read_text())
    lr = _flag_value(REF_SWEEP_FLAGS, "--lr")
    fr, fo = ref["schedule_factor"], ours["schedule_factor"]
    diffs = [abs(a - b) * lr for a, b in zip(fr, fo)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    sched = {"steps_compared": len(diffs), "max_abs_diff_lr": max(diffs), "at_update": worst,
             "steps_differing_over_1e-12": sum(x > 1e-12 for x in diffs),
             "samples": {str(s + 1): {"reference": fr[s] * lr, "ours": fo[s] * lr}
                         for s in (0, 1, 2, 99, 199, 999, 1998, 1999, 2000, 2001, 2500, 3000, 3499)}}
    # measured steps: the lr each trainer actually used, against its own schedule
    ref_used = max(abs(r["lr"] - fr[r["step"] - 1] * lr) for r in ref["steps"]) if ref["steps"] else None
    ours_used = max(abs(r["lr"] - fo[r["step"] - 1] * lr) for r in ours["steps"]) if ours["steps"] else None
    n = min(len(ref["steps"]), len(ours["steps"]))

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    def stats(steps):
        g = [r["grad_norm"] for r in steps[:n] if r.get("grad_norm") is not None]
        return {"grad_norm_mean": mean(g), "grad_norm_max": max(g) if g else None,
                "steps_clipped": sum(x > 1.0 for x in g), "steps": len(g),
                "loss_first": steps[0]["loss"] if steps else None,
                "loss_mean_last_20": mean([r["loss"] for r in steps[max(0, n - 20):n]])}

    doc = {"schedule": sched, "lr_used_vs_own_schedule_max_abs": {"reference": ref_used, "ours": ours_used},
           "groups": {"reference": _group_table(ref, lr, fr), "ours": _group_table(ours, lr, fo)},
           "clip_grad_norm": {"reference": ref["clip_grad_norm"], "ours": ours["clip_grad_norm"]},
           "dropouts": {"reference": ref["dropouts"], "ours": ours["dropouts"]},
           "init": {"reference": ref["init"], "ours": ours["init"]},
           "params": {"reference": ref["params"], "ours": ours["params"]},
           "tokens": {"reference": [ref["train_tokens"], ref["val_tokens"]],
                      "ours": [ours["train_tokens"], ours["val_tokens"]]},
           "evals": {"reference": ref["evals"], "ours": ours["evals"]},
           "curves": {"reference": stats(ref["steps"]), "ours": stats(ours["steps"]), "steps_compared": n}}
    _write(d / "comparison.json", doc)
    plot(ref, ours, d / "curves.png")
    print(json.dumps({k: doc[k] for k in ("schedule", "curves", "evals", "params")}, indent=1))
    return doc


def _group_table(doc: dict, lr: float, factors: list) -> list:
    """The parameter groups with each one's lr as a multiple of the scheduled lr at its last update
    (the reference's from the group lrs its optimizer held at that update; ours from the lr its
    group holds after the last one, which set_lr set for that update)."""
    last = doc["steps"][-1] if doc["steps"] else None
    out = []
    for i, g in enumerate(doc["groups"]):
        row = {k: v for k, v in g.items() if k not in ("members", "lr")}
        if last is not None:
            used = last["group_lrs"][i] if "group_lrs" in last else g["lr"]
            row["lr_mult"] = used / (lr * factors[last["step"] - 1])
        out.append(row)
    return out


def plot(ref: dict, ours: dict, path: Path) -> None:
    """Top: both training-loss curves and validation CE; bottom: the gradient norms before clipping."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for doc, label, color in ((ref, "reference trainer (v1 model, dense K_base)", "tab:orange"),
                              (ours, "kop-train (v2 model, 8-tap K_base)", "tab:blue")):
        steps = [r["step"] for r in doc["steps"]]
        ax.plot(steps, [r["loss"] for r in doc["steps"]], color=color, lw=0.9, alpha=0.8, label=f"{label}: train loss")
        ev = [e for e in doc["evals"] if e["step"] > 0]
        ax.plot([e["step"] for e in ev], [e["val_ce"] for e in ev], "o--", color=color, ms=5,
                label=f"{label}: val CE")
        gx.plot(steps, [r.get("grad_norm") for r in doc["steps"]], color=color, lw=0.8, alpha=0.8)
    gx.axhline(ref.get("clip_grad_norm", 1.0), color="0.3", lw=0.8, ls=":", label="clip")
    ax.set_ylabel("cross-entropy (nats / char)")
    ax.set_title(f"{PRESET}: first {min(len(ref['steps']), len(ours['steps']))} steps, seed "
                 f"{_flag_value(ref['argv'], '--seed', int)}, CPU")
    gx.set_xlabel("training step")
    gx.set_ylabel("grad norm\n(before clip)")
    for a in (ax, gx):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    gx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="recipe_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("reference", "ours"):
        s = sub.add_parser(name)
        s.add_argument("--data-path", required=True, help="Tiny Shakespeare input.txt")
        s.add_argument("--json", required=True, help="where to write the run's record")
        s.add_argument("--seed", type=int, default=42, help="seed of both runs (the sweep's first seed)")
        s.add_argument("--stop-after", type=int, default=200, help="training steps to run of the 3,500")
        s.add_argument("--eval-interval", type=int, default=50, help="validation every N steps")
        s.add_argument("--threads", type=int, default=1, help="torch threads")
        if name == "reference":
            s.add_argument("--reference-dir", required=True, help="folder holding the reference's k_language_model")
            s.add_argument("--reference-commit", default=None, help="its commit, recorded in the JSON")
            s.add_argument("--decay-impl", default="scan", choices=("scan", "mask", "block"),
                           help="the reference's decay path: mask (the sweep's), block, or scan (its math "
                                "through kop_triton's chunked scan, checked against mask first)")
        else:
            s.add_argument("--run-dir", default=None, help="kop-train --out (default: a new temporary folder)")
    s = sub.add_parser("compare")
    s.add_argument("--dir", required=True, help="folder with reference.json and ours.json")
    args = p.parse_args(argv)
    if args.cmd != "compare":
        torch.set_num_threads(args.threads)
    {"reference": run_reference, "ours": run_ours, "compare": compare}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
