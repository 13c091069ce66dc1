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
