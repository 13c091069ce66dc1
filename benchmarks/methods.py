"""What is timed: the methods (ours and the alternatives), their inputs and their float64 references.

Every method of one ``op`` takes the same inputs and returns one tensor; the harness checks it
against the float64 reference of the op before timing it.

ops
  scan       q, k (B, T, R), v (B, T, D), gamma (R,)            -> o (B, T, D)
  k2         x (B, T, D), u, v (D, R), alpha, gamma (R,), kernel (K,), gate_logit -> y (B, T, D)
  conv       x (B, T, D), weight (K,)                           -> y (B, T, D)
  attention  q, k, v (B, H, T, D/H)  causal softmax attention   -> o (B, H, T, D/H)
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from kop_triton.modules import init_decay_logit, init_kernel
from kop_triton.ops import causal_conv, decayed_scan, k2_mixer
from kop_triton.ops.conv import naive_causal_conv
from kop_triton.ops.k2 import k2_qk, reference_k2_mixer
from kop_triton.ops.scan import chunked_decayed_scan, naive_decayed_scan

# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


def spec_gamma(R: int, gamma_min: float = 0.05, gamma_max: float = 1.0) -> torch.Tensor:
    """Decays of a freshly initialised K2 mixer (the package's ``init_decay_logit``: log-spaced time
    constants, SPEC section 1), with the released v2 checkpoints' range gamma_min 0.05, gamma_max 1.0."""
    return gamma_min + (gamma_max - gamma_min) * torch.sigmoid(init_decay_logit(R, gamma_min, gamma_max))


def attention_heads(D: int) -> int:
    """Heads of the attention baseline at model width D: head dim 64 (D when D < 64)."""
    return D // 64 if D % 64 == 0 and D >= 64 else 1


class Problem:
    """Inputs of every op at one size, built once and shared by all methods (leaves require grad)."""

    def __init__(self, B: int, T: int, D: int, R: int, K: int, dtype: torch.dtype,
                 device: torch.device, seed: int = 0):
        self.B, self.T, self.D, self.R, self.K, self.dtype, self.device = B, T, D, R, K, dtype, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self._inputs: Dict[str, dict] = {}
        self._cot: Dict[str, torch.Tensor] = {}
        self.refs: Dict[tuple, object] = {}     # cache for the harness' references

    def _randn(self, *shape, scale=1.0, dtype=None):
        t = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32) * scale
        return t.to(dtype or self.dtype)

    def _x(self):
        if "x" not in self._inputs:
            self._inputs["x"] = {"x": self._randn(self.B, self.T, self.D)}
        return self._inputs["x"]["x"]

    def inputs(self, op: str) -> dict:
        if op in self._inputs:
            return self._inputs[op]
        B, T, D, R, K = self.B, self.T, self.D, self.R, self.K
        gamma = spec_gamma(R).to(self.device)
        if op == "scan":
            q = 0.5 * F.normalize(self._randn(B, T, R, dtype=torch.float32), dim=-1)   # alpha = sigmoid(0)
            k = F.normalize(self._randn(B, T, R, dtype=torch.float32), dim=-1)
            inp = {"q": q.to(self.dtype), "k": k.to(self.dtype), "v": self._x(), "gamma": gamma}
        elif op == "k2":   # a fresh KOperator's parameters: alpha = sigmoid(0), the package's kernel init
            inp = {"x": self._x(), "u": self._randn(D, R, scale=0.05, dtype=torch.float32),
                   "v": self._randn(D, R, scale=0.05, dtype=torch.float32),
                   "alpha": torch.full((R,), 0.5), "gamma": gamma, "kernel": init_kernel(K),
                   "gate_logit": torch.zeros(())}
        elif op == "conv":
            inp = {"x": self._x(), "weight": init_kernel(K)}
        elif op == "attention":
            H = attention_heads(D)
            inp = {n: self._randn(B, H, T, D // H) for n in ("q", "k", "v")}
        else:
            raise ValueError(f"unknown op {op!r}")
        inp = {n: t.to(self.device).requires_grad_(True) for n, t in inp.items()}
        self._inputs[op] = inp
        return inp

    def cotangent(self, op: str, like: torch.Tensor) -> torch.Tensor:
        if op not in self._cot:
            self._cot[op] = self._randn(*like.shape).to(like.dtype)
        return self._cot[op]


# --------------------------------------------------------------------------------------
# the quadratic formulation of the reference implementation (its default "mask" path):
# a (T, T, R) decay mask exp((i-j) log gamma) on and below the diagonal, contracted with the
# materialised per-token outer products k_j (x) v_j, (B, T, R, D), into every state S_t,
# then read out by q_t.  Written here from the formula; O(T^2 R D) time, O(T^2 R + T R D) memory.
# --------------------------------------------------------------------------------------


def mask_decayed_scan(q, k, v, gamma):
    T = q.shape[1]
    i = torch.arange(T, device=q.device)
    # the mask itself in at least float32 (integer lags are not exact in bf16), then in the inputs' dtype
    mt = torch.promote_types(q.dtype, torch.float32)
    lag = (i[:, None] - i[None, :]).clamp(min=0).to(mt)                   # (T, T)
    causal = (i[:, None] >= i[None, :]).to(mt)                            # (T, T)
    log_g = torch.log(gamma.clamp(min=1e-8)).to(mt)                       # (R,)
    decay = (torch.exp(lag[..., None] * log_g) * causal[..., None]).to(q.dtype)   # (T, T, R)
    kv = k[..., :, None] * v[..., None, :]                                # (B, T, R, D)
    states = torch.einsum("tjr,bjrd->btrd", decay, kv)                    # (B, T, R, D)
    return torch.einsum("btr,btrd->btd", q, states)                       # (B, T, D)


def block_decayed_scan(q, k, v, gamma, block: int = 128):
    """The reference implementation's linear path (its "block" decay), written here from the
    formula: blocks of 128 tokens; inside a block every per-token state S_t (B, blk, R, D) is
    materialised from a (blk, blk, R) decay mask contracted with the outer products k_j (x) v_j,
    plus the carried state decayed by gamma^(t+1); o_t = q_t . S_t.  Linear in T, but it moves
    R x D floats per token where the chunked algorithm moves D."""
    B, T, R = q.shape
    cd = torch.promote_types(q.dtype, torch.float32)
    log_g = torch.log(gamma.clamp(min=1e-8)).to(cd)
    state = torch.zeros(B, R, v.shape[-1], dtype=cd, device=q.device)
    outs = []
    for s in range(0, T, block):
        n = min(block, T - s)
        i = torch.arange(n, device=q.device)
        lag = (i[:, None] - i[None, :]).clamp(min=0).to(cd)
        causal = (i[:, None] >= i[None, :]).to(cd)
        decay = torch.exp(lag[..., None] * log_g) * causal[..., None]                 # (n, n, R)
        kv = k[:, s:s + n, :, None].to(cd) * v[:, s:s + n, None, :].to(cd)           # (B, n, R, D)
        carry = torch.exp((i + 1)[:, None].to(cd) * log_g)                           # (n, R)
        states = torch.einsum("tjr,bjrd->btrd", decay, kv) + state[:, None] * carry[None, :, :, None]
        outs.append(torch.einsum("btr,btrd->btd", q[:, s:s + n].to(cd), states))
        state = states[:, -1]
    return torch.cat(outs, dim=1).to(v.dtype)


# --------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------

NO_CUDA = "skipped: no CUDA device (Triton kernels are never timed through the interpreter)"


def _fla_chunk_gla():
    from fla.ops.gla import chunk_gla   # noqa: WPS433 - optional peer
    return chunk_gla


def _fla_missing() -> Optional[str]:
    try:
        _fla_chunk_gla()
        return None
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken install
        return f"skipped: flash-linear-attention not importable ({type(exc).__name__}: {exc})"[:200]


def _scan(backend):
    def fn(i):
        return decayed_scan(i["q"], i["k"], i["v"], i["gamma"], backend=backend)[0]
    return fn


def _scan_mask(i):
    return mask_decayed_scan(i["q"], i["k"], i["v"], i["gamma"])


def _scan_block(i):
    return block_decayed_scan(i["q"], i["k"], i["v"], i["gamma"])


def _est_block(B, T, D, R, s, mode):
    # per-token states and outer products of every block: measured 409 MB forward+backward at
    # B*T = 8192, R = 16, D = 256 (about 12 bytes per B*T*R*D element), 21 MB forward
    return max(s, 4) * B * T * R * D * (3 if mode == "fwd_bwd" else 1)


def _scan_fla(i):
    chunk_gla = _fla_chunk_gla()
    q, k, v, gamma = i["q"], i["k"], i["v"], i["gamma"]
    B, T, R = q.shape
    # chunk_gla takes a per-token log decay g (B, T, H, K); ours is one constant per key channel
    g = torch.log(gamma).to(torch.float32).view(1, 1, 1, R).expand(B, T, 1, R).contiguous()
    kw = {}
    if "head_first" in inspect.signature(chunk_gla).parameters:
        kw["head_first"] = False
    o, _ = chunk_gla(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), g, scale=1.0, **kw)
    return o.squeeze(2)


def _k2(backend):
    def fn(i):
        return k2_mixer(i["x"], i["u"], i["v"], i["alpha"], i["gamma"], i["kernel"], i["gate_logit"],
                        backend=backend)[0]
    return fn


def _conv(backend):
    def fn(i):
        return causal_conv(i["x"], i["weight"], backend=backend)[0]
    return fn


def _sdpa(i):
    return F.scaled_dot_product_attention(i["q"], i["k"], i["v"], is_causal=True)


# Modelled memory traffic per token (bytes): benchmarks/traffic.py, launch by launch (a model,
# not a measurement; K = 8 taps, the per-token figures barely depend on T).
def _bytes_model(path):
    def fn(D, R, s, mode):
        from .traffic import Shape, model
        m = model(path, Shape(1, 65536, D, R, 8, s))
        return m["fwd"]["bytes_per_token"] + (m["bwd"]["bytes_per_token"] if mode != "fwd" else 0)
    return fn


_bytes_k2_fused = _bytes_model("fused")
_bytes_k2_unfused = _bytes_model("unfused")


def op_min_bytes(op: str, D: int, R: int, s: int, mode: str) -> int:
    """Bytes per token a perfect kernel of the op must move (inputs read once, outputs written once)."""
    fwd, bwd = {
        "scan": (2 * R + 2 * D, (2 * R + 2 * D) + (2 * R + D)),   # bwd reads q,k,v,do; writes dq,dk,dv
        "k2": (2 * D, 3 * D),
        "conv": (2 * D, 3 * D),
        "attention": (4 * D, 8 * D),                               # bwd reads q,k,v,o,do; writes dq,dk,dv
    }[op]
    return (fwd if mode == "fwd" else fwd + bwd) * s


def _est_naive_scan(B, T, D, R, s, mode):
    # naive_decayed_scan materialises a (B, T, T, R) product inside its einsum (measured), in
    # float32 for float32/bf16/fp16 inputs, float64 for float64
    per = max(s, 4) * (B * T * T * (R + 2) + R * T * T)
    return per * (3 if mode == "fwd_bwd" else 1)


def _est_mask(B, T, D, R, s, mode):
    per = max(s, 4) * 3 * T * T * R + s * 3 * B * T * R * D     # float32 mask, states in the inputs' dtype
    return per * (3 if mode == "fwd_bwd" else 1)


@dataclass
class Method:
    name: str                 # "<op>/<variant>"
    op: str
    group: str                # "ours" | "alternative"
    label: str
    fn: Callable[[dict], torch.Tensor]
    p_time: int = 1           # time of one sequence ~ T^p_time (budget extrapolation, slope expected)
    p_mem: int = 1
    triton: bool = False      # one of our Triton kernels: CUDA only
    needs: Optional[Callable[[], Optional[str]]] = None   # extra availability check -> reason or None
    long_ok: bool = False     # also run at the long-T points (1M on GPU)
    mem_estimate: Optional[Callable] = None               # (B, T, D, R, s, mode) -> bytes, first point
    bytes_model: Optional[Callable] = None                # (D, R, s, mode) -> modelled bytes per token

    def unavailable(self, device: torch.device) -> Optional[str]:
        if (self.triton or self.name == "scan/fla_chunk_gla") and device.type != "cuda":
            return NO_CUDA if self.triton else "skipped: no CUDA device (chunk_gla is a Triton kernel)"
        if self.triton and os.environ.get("TRITON_INTERPRET") == "1":
            return "skipped: TRITON_INTERPRET=1 is set (the Triton interpreter is never timed)"
        return self.needs() if self.needs is not None else None


METHODS = [
    # ours
    Method("scan/triton", "scan", "ours", "decayed scan, Triton", _scan("triton"), triton=True, long_ok=True),
    Method("scan/chunked", "scan", "ours", "decayed scan, chunked PyTorch", _scan("chunked")),
    Method("k2/triton_fused", "k2", "ours", "K2 mixer, fused Triton", _k2("triton"), triton=True,
           long_ok=True, bytes_model=_bytes_k2_fused),
    Method("k2/triton_unfused", "k2", "ours", "K2 mixer, Triton scan + Triton conv + elementwise",
           _k2("triton_unfused"), triton=True, bytes_model=_bytes_k2_unfused),
    Method("k2/chunked", "k2", "ours", "K2 mixer, fused chunked PyTorch", _k2("chunked"),
           bytes_model=_bytes_model("chunked")),
    Method("conv/triton", "conv", "ours", "causal conv, Triton", _conv("triton"), triton=True, long_ok=True),
    # alternatives
    Method("scan/naive", "scan", "alternative", "decayed scan, naive quadratic (B,T,T,R)", _scan("naive"),
           p_time=2, p_mem=2, mem_estimate=_est_naive_scan),
    Method("scan/recurrent", "scan", "alternative", "decayed scan, one step per token", _scan("recurrent")),
    Method("scan/mask", "scan", "alternative", "decayed scan, reference 'mask' formulation (T,T,R) mask",
           _scan_mask, p_time=2, p_mem=2, mem_estimate=_est_mask),
    Method("scan/ref_block", "scan", "alternative",
           "decayed scan, reference 'block' linear path (per-token states in blocks of 128)",
           _scan_block, mem_estimate=_est_block),
    Method("scan/fla_chunk_gla", "scan", "alternative", "flash-linear-attention chunk_gla (K=R, V=D)",
           _scan_fla, needs=_fla_missing),
    Method("k2/naive", "k2", "alternative", "K2 mixer, naive quadratic scan + conv1d", _k2("naive"),
           p_time=2, p_mem=2, mem_estimate=_est_naive_scan, bytes_model=_bytes_k2_unfused),
    Method("k2/recurrent", "k2", "alternative", "K2 mixer, recurrent scan + conv1d", _k2("recurrent"),
           bytes_model=_bytes_k2_unfused),
    Method("conv/conv1d", "conv", "alternative", "causal conv, F.conv1d", _conv("naive")),
    Method("attention/sdpa", "attention", "alternative", "causal softmax attention (SDPA)", _sdpa, p_time=2),
]
METHODS_BY_NAME = {m.name: m for m in METHODS}


def select(names) -> list:
    """Methods by name, or by glob-free prefix ("scan/" selects every scan method)."""
    out = []
    for n in names:
        hits = [m for m in METHODS if m.name == n or (n.endswith("/") and m.name.startswith(n))]
        if not hits:
            raise ValueError(f"unknown method {n!r}; known: {[m.name for m in METHODS]}")
        out += [m for m in hits if m not in out]
    return out


# --------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------


def naive_scan_rows(q, k, v, gamma, rows):
    """The naive formula o_t = sum_{j<=t} sum_r q_tr gamma_r^(t-j) k_jr v_j at the positions ``rows``,
    in float64: (B, len(rows), D).  Linear memory in T (one row at a time)."""
    q, k, v, g = (t.detach().to(torch.float64) for t in (q, k, v, gamma))
    out = []
    for t in rows.tolist():
        lag = torch.arange(t, -1, -1, device=q.device, dtype=torch.float64)          # t - j, j = 0..t
        w = torch.einsum("br,bjr,jr->bj", q[:, t], k[:, : t + 1], g[None, :] ** lag[:, None])
        out.append(torch.einsum("bj,bjd->bd", w, v[:, : t + 1]))
    return torch.stack(out, dim=1)


def reference_rows(op: str, inp: dict, rows: torch.Tensor) -> torch.Tensor:
    """Float64 reference output of the op at the positions ``rows`` (same layout as select_rows)."""
    d = {n: t.detach().to(torch.float64) for n, t in inp.items()}
    if op == "scan":
        return naive_scan_rows(d["q"], d["k"], d["v"], d["gamma"], rows)
    if op == "k2":
        q, k = k2_qk(d["x"], d["u"], d["v"], d["alpha"])
        c = naive_causal_conv(d["x"], d["kernel"])[0][:, rows]
        return torch.sigmoid(d["gate_logit"]) * c + naive_scan_rows(q, k, d["x"], d["gamma"], rows)
    if op == "conv":
        return naive_causal_conv(d["x"], d["weight"])[0][:, rows]
    if op == "attention":
        q, k, v = d["q"], d["k"], d["v"]
        scale = q.shape[-1] ** -0.5
        out = []
        for t in rows.tolist():
            s = torch.einsum("bhd,bhjd->bhj", q[:, :, t], k[:, :, : t + 1]) * scale
            out.append(torch.einsum("bhj,bhjd->bhd", torch.softmax(s, dim=-1), v[:, :, : t + 1]))
        return torch.stack(out, dim=2)
    raise ValueError(op)


def select_rows(op: str, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    rows = rows.to(out.device)
    return out[:, :, rows] if op == "attention" else out[:, rows]


def grad_reference(op: str, inp: dict, dy: torch.Tensor, B: int, T: int, D: int, R: int,
                   mem_limit: float):
    """Float64 gradients of sum(out * dy) w.r.t. every input: (grads dict, name of the reference).

    The naive (quadratic) reference when it fits in ``mem_limit`` bytes; otherwise the chunked
    algorithm in float64 (itself checked against naive by the test suite) for scan / k2; None
    for attention beyond the limit (its forward is still checked at sampled rows)."""
    leaves = {n: t.detach().to(torch.float64).requires_grad_(True) for n, t in inp.items()}
    d = leaves
    naive_fits = _est_naive_scan(B, T, D, R, 8, "fwd_bwd") <= mem_limit
    if op == "scan":
        fn = naive_decayed_scan if naive_fits else chunked_decayed_scan
        name = "naive_fp64" if naive_fits else "chunked_fp64"
        out = fn(d["q"], d["k"], d["v"], d["gamma"])[0]
    elif op == "k2":
        name = "naive_fp64" if naive_fits else "chunked_fp64"
        out = reference_k2_mixer(d["x"], d["u"], d["v"], d["alpha"], d["gamma"], d["kernel"],
                                 d["gate_logit"], scan_backend="naive" if naive_fits else "chunked")[0]
    elif op == "conv":
        name = "naive_fp64"
        out = naive_causal_conv(d["x"], d["weight"])[0]
    elif op == "attention":
        Bq, H, _, hd = d["q"].shape
        if 8 * 4 * Bq * H * T * T > mem_limit:
            return None, f"none: a float64 (B, H, T, T) attention reference would exceed {mem_limit / 2**30:.1f} GiB"
        name = "math_fp64"
        s = d["q"] @ d["k"].transpose(-1, -2) * hd ** -0.5
        mask = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
        out = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ d["v"]
    else:
        raise ValueError(op)
    (out * dy.to(torch.float64)).sum().backward()
    return {n: t.grad for n, t in leaves.items()}, name
