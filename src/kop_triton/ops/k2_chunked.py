"""The K2 mixing term as one chunked PyTorch autograd Function with a hand-written backward: the
fast CPU path of ``k2_mixer`` (backend "chunked").

Per chunk c of C tokens the scan already forms A[i, j] = sum_r q_ir k_jr gamma_r^(i-j) and
multiplies it with the chunk's values, which in the K2 mixer are x itself.  The gated causal
conv multiplies the same x by a banded Toeplitz matrix, so it is folded into the same product:

    y_chunk = (A + g * Kband) @ x_chunk + (q * gamma^(i+1)) @ S_c + g * Kcross @ tail_{c-1}

    Kband[i, j]  = kernel[i - j]          for 0 <= i - j < K        (C, C)
    Kcross[i, j] = kernel[i + K - 1 - j]  for j >= i                (K-1, K-1)
    tail_{c-1}   = the last K-1 inputs before chunk c (the conv state for c = 0)

so the conv costs one (C, C) add to A and a (K-1)-row product per chunk, instead of a
depthwise convolution forward and backward over (B, T, D) and a separate gate-and-add pass.
The backward gets the conv's share of dx from the same A^T @ dy product the scan needs, and the
kernel and gate gradients from the chunk products dA = dy @ x^T the scan forms anyway
(W[l] = sum of dA on lag l plus the cross-chunk part; dkernel = g W, dgate = g (1 - g) <W, kernel>).
q and k (B, T, R) are projected once from x onto [u | v], and their normalisation backward is
chained analytically (``k2.py``'s ``_qk_fwd`` / ``_qk_bwd``).

Requires K - 1 <= C <= T (the conv reaches into the previous chunk only, and the final conv state
is the last K - 1 rows of x), a shared (K,) kernel, float32 or float64 x and no ``cu_seqlens``; ``k2_mixer`` falls back to the unfused composition otherwise.
Numerics are those of ``chunked.py`` (exponents >= 0, states recomputed from the saved chunk
boundaries, no atomics), in x's dtype.
"""
from __future__ import annotations

import torch

from .scan_chunked import CPU_CHUNK, from_chunks, scan_chunks_bwd, scan_chunks_fwd, to_chunks
from .k2 import _qk_bwd, _qk_fwd


def _lag_onehots(C: int, K: int, dtype, device):
    """One-hot lag tables: E (C, C, K) with E[i, j, l] = [i - j == l], and Ec (K-1, K-1, K) with
    Ec[i, j, l] = [i + K - 1 - j == l] (j >= i), so Kband = E @ kernel and Kcross = Ec @ kernel."""
    i = torch.arange(C, device=device)
    lag = i[:, None] - i[None, :]
    taps = torch.arange(K, device=device)
    E = (lag[..., None] == taps).to(dtype)
    ic = torch.arange(K - 1, device=device)
    lagc = ic[:, None] + (K - 1) - ic[None, :]
    Ec = ((lagc[..., None] == taps) & (ic[None, :] >= ic[:, None])[..., None]).to(dtype)
    return E, Ec


def fused_supported(x, kernel, chunk_size: int, cu_seqlens) -> bool:
    """Whether ``ChunkedK2Fn`` computes this call (else the unfused composition does)."""
    C = max(1, min(int(chunk_size), x.shape[1]))
    return (cu_seqlens is None and kernel.dim() == 1 and x.dtype in (torch.float32, torch.float64)
            and x.shape[1] > 0 and kernel.shape[0] - 1 <= C)


class ChunkedK2Fn(torch.autograd.Function):
    """Inputs in x's dtype (float32 or float64); s0 (N, R, D) and c0 (N, K-1, D) may be None."""

    @staticmethod
    def forward(ctx, x, u, v, alpha, gamma, kernel, gate_logit, s0, c0, chunk_size: int, want_final: bool):
        B, T, D = x.shape
        R, K = u.shape[1], kernel.shape[0]
        C = chunk_size
        dt = x.dtype
        uv = torch.cat([u, v], 1).to(dt)                                 # (D, 2R)
        a, g_, w = alpha.to(dt), gamma.to(dt), kernel.to(dt)
        q, k, saved_qk = _qk_fwd(x, uv, a)                               # (B, T, R) each
        xc = to_chunks(x, C)                                             # (B, n, C, D)
        n = xc.shape[1]
        last = T - (n - 1) * C
        gate = torch.sigmoid(gate_logit.to(dt)).reshape(())
        E, Ec = _lag_onehots(C, K, dt, x.device)
        band = gate * (E @ w)                                            # (C, C)
        o, sT, saved_scan = scan_chunks_fwd(to_chunks(q, C), to_chunks(k, C), xc, g_,
                                            None if s0 is None else s0.to(dt), last, band)
        tails = None
        if K > 1:
            head = (torch.zeros(B, 1, K - 1, D, dtype=dt, device=x.device) if c0 is None
                    else c0.to(dt).unsqueeze(1))
            tails = torch.cat([head, xc[:, :-1, C - K + 1:]], 1)         # (B, n, K-1, D)
            o[:, :, :K - 1] += (gate * (Ec @ w)) @ tails
        y = from_chunks(o, T)
        ctx.save_for_backward(x, uv, a, w, gate, E, Ec, tails, *saved_qk, *saved_scan[:-1])
        ctx.meta = (T, C, R, K, last, s0 is not None, c0 is not None)
        ctx.grad_dtypes = tuple(t.dtype if t is not None else None
                                for t in (u, v, alpha, gamma, kernel, gate_logit, s0, c0))
        ctx.gate_shape = gate_logit.shape
        ctx.set_materialize_grads(False)
        sT_out = cT = None
        if want_final:
            sT_out = sT.clone()
            cT = x[:, T - (K - 1):].clone()                              # T >= C >= K - 1: the last inputs
        return y, sT_out, cT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dscan, dconv):
        T, C, R, K, last, has_s0, has_c0 = ctx.meta
        x, uv, a, w, gate, E, Ec, tails, *rest = ctx.saved_tensors
        saved_qk, saved_scan = rest[:6], (*rest[6:], last)
        xc = saved_scan[2]
        B, n, _, D = xc.shape
        doc = torch.zeros_like(xc) if dy is None else to_chunks(dy, C)
        dqc, dkc, dxc, dgamma, ds0, dA = scan_chunks_bwd(saved_scan, doc, dscan)
        # conv: W[l] = sum over positions of <dy_t, x_{t-l}>, from the band of dA and the tails
        Wk = torch.einsum("ij,ijl->l", dA.sum((0, 1)), E)
        dc0 = None
        if K > 1:
            dhead = doc[:, :, :K - 1]                                    # (B, n, K-1, D)
            dtails = (gate * (Ec @ w)).t() @ dhead                       # (B, n, K-1, D)
            dxc[:, :-1, C - K + 1:] += dtails[:, 1:]
            if has_c0:
                dc0 = dtails[:, 0]
            Wk = Wk + torch.einsum("ij,ijl->l", torch.einsum("bnid,bnjd->ij", dhead, tails), Ec)
        dx = from_chunks(dxc, T)
        if dconv is not None and K > 1:
            dx[:, T - (K - 1):] += dconv.to(dx.dtype)                   # the final conv state is x's last K-1 rows
        dp, duv, dalpha = _qk_bwd(x, uv, a, saved_qk, from_chunks(dqc, T), from_chunks(dkc, T))
        dx = dx.reshape(B * T, D).addmm_(dp.reshape(B * T, 2 * R), uv.t()).view(B, T, D)
        dkernel = gate * Wk
        dgate = gate * (1 - gate) * (Wk * w).sum()
        grads = (duv[:, :R], duv[:, R:], dalpha, dgamma, dkernel, dgate.reshape(ctx.gate_shape),
                 ds0 if has_s0 else None, dc0 if has_c0 else None)
        grads = tuple(None if gr is None else gr.to(dtype, memory_format=torch.contiguous_format, copy=True)
                      for gr, dtype in zip(grads, ctx.grad_dtypes))
        return (dx, *grads, None, None)


def chunked_k2_mixer(x, u, v, alpha, gamma, kernel, gate_logit, *, initial_state=None,
                     output_final_state=False, chunk_size: int = CPU_CHUNK):
    """The fused chunked K2 mixer (module docstring); arguments validated by ``k2_mixer`` and
    ``fused_supported`` true.  -> (y (B, T, D) in x's dtype, (scan_state, conv_state) or None)."""
    s0, c0 = (None, None) if initial_state is None else initial_state
    C = max(1, min(int(chunk_size), x.shape[1]))
    y, sT, cT = ChunkedK2Fn.apply(x, u, v, alpha, gamma, kernel, gate_logit, s0, c0, C, bool(output_final_state))
    return y, ((sT, cT) if output_final_state else None)
