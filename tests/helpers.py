"""Shared test utilities: devices, tolerances, error reports, input factories."""
from __future__ import annotations

import os
from pathlib import Path

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton kernels run on CUDA tensors on a GPU machine, on CPU tensors under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a test dependency
    HAS_TRITON = False
TRITON_OK = HAS_TRITON and (DEVICE == "cuda" or INTERPRET)
# Skip reasons.  Tests of the Triton kernels run on CUDA or through the interpreter; on a machine
# with neither (or `make test`'s second mode, TRITON_INTERPRET=0 without CUDA: as on a GPU machine)
# they skip, and every such reason names CUDA (conftest's --only-cuda-skips fails any other skip).
NEEDS_TRITON = ("needs CUDA (or TRITON_INTERPRET=1: the Triton interpreter on CPU)" if HAS_TRITON
                else "needs triton (not installed) and CUDA or TRITON_INTERPRET=1")
CUDA_ONLY_LONG = "CUDA only: a million tokens is out of the interpreter's reach"
CUDA_ONLY_INT64 = "CUDA only: B*T*D > 2^31 needs about 20 GiB of device memory; the interpreter cannot run it"

# relative RMS error bounds (vs a float64 naive reference), one row per (backend class, dtype)
TOL = {
    ("torch", torch.float64): 1e-6,
    ("torch", torch.float32): 1e-5,
    ("triton", torch.float64): 1e-5,
    ("triton", torch.float32): 1e-5,
    ("triton", torch.float16): 5e-3,
    ("triton", torch.bfloat16): 3e-2,
    ("torch", torch.float16): 5e-3,
    ("torch", torch.bfloat16): 3e-2,
}

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    num = (a - e).pow(2).mean().sqrt()
    den = e.pow(2).mean().sqrt()
    return float(num / den) if float(den) > 0 else float(num)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Relative-RMS check that reports max-abs error and where the worst element sits."""
    assert actual is not None, f"{name}: got None"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    err = rel_rms(a, e)
    if not err <= tol:
        diff = (a - e).abs()
        idx = torch.nonzero(diff == diff.max())[0].tolist() if diff.numel() else []
        raise AssertionError(
            f"{name}: relative RMS error {err:.3e} > {tol:.1e}; max abs error {float(diff.max()):.3e} "
            f"at {idx} (actual {float(a[tuple(idx)]):.6g}, expected {float(e[tuple(idx)]):.6g})")


# Tiny KStackLM variants (KStackConfig keyword arguments), one per head and layout: the linear head tied
# to the embedding, an embedding projection with a kernel per layer, the GELU head with refinement
# steps, the adaptive-softmax head
LM_CONFIGS = {
    "default-linear": dict(vocab_size=13, d_model=12, n_k2=2, rank=3, kernel_size=4),
    "emb-proj-per-layer-kernel": dict(vocab_size=13, d_model=10, emb_dim=6, n_k2=3, rank=2, kernel_size=5,
                                      shared_kernel=False),
    "gelu-head-refine": dict(vocab_size=13, d_model=8, n_k2=2, rank=2, kernel_size=3, head="gelu", head_mult=2,
                             refine_steps=2),
    "adaptive": dict(vocab_size=24, d_model=16, n_k2=1, rank=4, kernel_size=2, head="adaptive",
                     adaptive_cutoffs=[6, 12], adaptive_div_value=2.0),
}


def make_gamma(R: int, lo: float = 0.01, hi: float = 1.0, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Decays spread over [lo, hi] across channels, both ends included (hi = 1.0 is no decay)."""
    if R == 1:
        return torch.tensor([hi], dtype=dtype, device=device)
    return torch.linspace(lo, hi, R, dtype=dtype, device=device)


def scan_inputs(B, T, R, D, dtype=torch.float64, device="cpu", seed=0, gamma=None, init=True,
                requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, R, generator=g, dtype=torch.float64) / R ** 0.5
    k = torch.randn(B, T, R, generator=g, dtype=torch.float64) / R ** 0.5
    v = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, R, D, generator=g, dtype=torch.float64) if init else None
    gm = make_gamma(R) if gamma is None else gamma.to(torch.float64)
    out = [q.to(dtype), k.to(dtype), v.to(dtype), gm.to(dtype if dtype == torch.float64 else torch.float32)]
    if h0 is not None:
        h0 = h0.to(torch.float64 if dtype == torch.float64 else torch.float32)
    out.append(h0)
    out = [None if t is None else t.to(device).requires_grad_(requires_grad) for t in out]
    return out


def cotangent_grads(outputs, leaves, seed: int = 1):
    """Gradients of sum_i <outputs[i], random cotangent_i> w.r.t. ``leaves`` (None outputs and
    leaves skipped): every output, final states included, gets its own random float64 cotangent."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum()
               for o in outputs if o is not None)
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


def assert_triton_matches_chunked(checkpoint_dir, text: str, n_tokens: int) -> None:
    """The first n_tokens of a checkpoint's validation split through the Triton path (the
    interpreter on CPU) give the chunked path's logits (1e-5) and cross-entropy."""
    import math

    import torch.nn.functional as F
    from kop_triton.checkpoint import load_checkpoint
    from kop_triton.eval import validation_ids
    m, tok = load_checkpoint(checkpoint_dir)
    ids = validation_ids(tok, text, 0.1)[:n_tokens + 1]
    x, y = ids[None, :-1], ids[None, 1:]
    m.set_backend("chunked")
    with torch.no_grad():
        ref = m(x)
        m.set_backend("triton")
        m.to(DEVICE)
        got = m(x.to(DEVICE))
        ce = m(x.to(DEVICE), y.to(DEVICE))
    assert_close("logits triton vs chunked", got, ref, 1e-5)
    assert math.isclose(float(ce), float(F.cross_entropy(ref[0], y[0])), rel_tol=1e-5)


# Bad conv arguments, checked alike by causal_conv and k2_mixer (both run ops/conv.py's
# _check_conv_args), for x of shape (2, 8, 6) and a K = 4 kernel:
# case -> (exception, message, shape of the bad weight, shape of the bad conv state)
CONV_ARG_ERRORS = {
    "weight_3d": (ValueError, r"weight must be a floating tensor of shape \(K,\) or \(D, K\)", (6, 4, 1), None),
    "K0": (ValueError, r"weight must have 1 <= K <= 4096", (0,), None),
    "D_mismatch": (ValueError, r"must have D = 6 rows", (5, 4), None),
    "conv_state_shape": (ValueError, r"initial_state must have shape \(N, K-1, D\) = \(2, 3, 6\)", None, (2, 4, 6)),
}


def conv_arg_error_cases():
    """CONV_ARG_ERRORS as (case, exception, message) rows for pytest.mark.parametrize."""
    return [(case, exc, match) for case, (exc, match, _, _) in CONV_ARG_ERRORS.items()]


def with_bad_conv_arg(case: str, weight, conv_state):
    """(weight, conv_state) with the bad one of CONV_ARG_ERRORS[case] put in its place."""
    _, _, w_shape, c_shape = CONV_ARG_ERRORS[case]
    return (weight if w_shape is None else torch.randn(*w_shape),
            conv_state if c_shape is None else torch.randn(*c_shape))


def assert_triton_on_cpu_is_a_clear_error(monkeypatch, call) -> None:
    """``call()`` runs an op with backend="triton" on CPU tensors; without TRITON_INTERPRET it
    must raise a ValueError naming the backend and the device, not crash in Triton's driver lookup."""
    import pytest
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' runs Triton kernels on CUDA tensors.*got tensors on cpu"):
        call()


def assert_cli_usage_error(capsys, main, prog: str, args, match: str) -> None:
    """``main(args)`` (a tool's entry point) exits with status 2 and writes exactly one line,
    ``PROG: error: ...`` containing ``match``, and no traceback."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and "Traceback" not in err, err
    assert match in err, err


# ---- int64 offsets: a float64 reference computed block by block ----------------------------

INT32_EDGE = 2 ** 31            # element offsets at or past this overflow int32 pointer arithmetic


class ErrorTally:
    """Relative RMS errors of quantities compared piece by piece (tensors too large to hold in
    float64 at once): over all their elements, and separately over the rows whose element offset
    passes ``edge_row`` (so that an error confined to those rows is not averaged away)."""

    def __init__(self, edge_row: int):
        self.edge_row = edge_row
        self.sums = {}          # (name, region) -> [sum sq diff, sum sq ref, max abs diff, numel]

    def add(self, name: str, actual: torch.Tensor, expected: torch.Tensor, row0=None) -> None:
        """``actual`` / ``expected``: the same piece; ``row0``: its first row (dim 1), None for a
        piece without rows (a state, a parameter)."""
        assert actual is not None, f"{name}: got None"
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        a = actual.detach().to(expected.device, torch.float64)
        e = expected.detach().double()
        assert bool(torch.isfinite(a).all()), f"{name}: non-finite values (rows from {row0})"
        parts = [("all", a, e)]
        if row0 is not None and row0 + a.shape[1] > self.edge_row:
            cut = max(0, self.edge_row - row0)
            parts.append(("past the int32 edge", a[:, cut:], e[:, cut:]))
        for region, x, y in parts:
            acc = self.sums.setdefault((name, region), [0.0, 0.0, 0.0, 0])
            if x.numel():
                d = x - y
                acc[0] += float(d.pow(2).sum())
                acc[1] += float(y.pow(2).sum())
                acc[2] = max(acc[2], float(d.abs().max()))
                acc[3] += x.numel()

    def check(self, tol: float, tols=None, max_factor: float = 20.0) -> None:
        """Every quantity within ``tol`` (``tols``: per-name overrides) in relative RMS error, and
        its largest error within ``max_factor * tol`` of the reference's RMS value (one element read
        from a wrong offset is off by about the RMS value, which the RMS error alone would average
        away over millions of elements), in both regions."""
        bad = []
        for (name, region), (num, den, mx, n) in sorted(self.sums.items()):
            err = (num / den) ** 0.5 if den > 0 else num ** 0.5
            rms = (den / n) ** 0.5 if n else 0.0
            t = (tols or {}).get(name, tol)
            if not (err <= t and mx <= max_factor * t * rms):
                bad.append(f"{name} ({region}, {n} elements): relative RMS error {err:.3e} (bound {t:.1e}), "
                           f"max abs error {mx:.3e} = {mx / rms if rms else float('inf'):.3g} x the RMS value "
                           f"{rms:.3e} (bound {max_factor * t:.3g} x)")
        assert not bad, "\n".join(bad)

    def regions(self, name: str):
        return {r for (n, r) in self.sums if n == name}


def check_blockwise(step, seqs, params, state0, got, dout, dfinal, block: int, tally: ErrorTally) -> None:
    """Compare a kernel's run of a sequence op with a float64 reference computed ``block`` rows at
    a time, the state carried across blocks (forward), and the backward block by block from the
    end, each block recomputed from the state entering it (as the chunked kernels do, in float64).

    step(seq_blocks, params, states) -> (out_block, states_out): the float64 reference op on one
    block, differentiable.  seqs / params / state0: lists of (name, tensor) as fed to the kernel:
    (1, T, *) sequences, parameters, initial states.  got: the kernel's results by name: "out",
    "final <state>", and "d<name>" for every sequence, parameter and state.  dout, dfinal: the
    cotangents the kernel's backward got (of out and of each final state).  Tallies everything."""
    f64 = lambda t: t.detach().double()                            # noqa: E731
    T = seqs[0][1].shape[1]
    starts = list(range(0, T, block))
    par = [f64(t) for _, t in params]
    states = [[f64(t) for _, t in state0]]
    with torch.no_grad():
        for a in starts:
            out, st = step([f64(t[:, a:a + block]) for _, t in seqs], par, states[-1])
            tally.add("out", got["out"][:, a:a + block], out, a)
            states.append([f64(s) for s in st])
    for (n, _), s_ref in zip(state0, states[-1]):
        tally.add(f"final {n}", got[f"final {n}"], s_ref)
    dstate = [f64(d) for d in dfinal]
    dpar = [torch.zeros_like(p) for p in par]
    ns, npar = len(seqs), len(par)
    for i in reversed(range(len(starts))):
        a = starts[i]
        xs = [f64(t[:, a:a + block]).requires_grad_() for _, t in seqs]
        ps = [p.clone().requires_grad_() for p in par]
        st = [s.clone().requires_grad_() for s in states[i]]
        out, st_out = step(xs, ps, st)
        grads = torch.autograd.grad([out, *st_out], xs + ps + st, [f64(dout[:, a:a + block]), *dstate],
                                    allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs + ps + st)]
        for (n, _), g in zip(seqs, grads[:ns]):
            tally.add(f"d{n}", got[f"d{n}"][:, a:a + block], g, a)
        dpar = [acc + g for acc, g in zip(dpar, grads[ns:ns + npar])]
        dstate = grads[ns + npar:]
    for (n, _), g in zip(params, dpar):
        tally.add(f"d{n}", got[f"d{n}"], g)
    for (n, _), g in zip(state0, dstate):
        tally.add(f"d{n}", got[f"d{n}"], g)
