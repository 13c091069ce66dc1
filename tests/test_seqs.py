"""Packed sequences on the host side (kernels/seqs.py ``Varlen``): the chunk and block tables against a
per-sequence walk, built from one host read of cu_seqlens; the ops' argument check builds it once and
the Triton paths read cu_seqlens nowhere else, forward or backward."""
import pytest
import torch

from helpers import NEEDS_TRITON, TRITON_OK
from kop_triton import causal_conv, decayed_scan, k2_mixer
from kop_triton.kernels.seqs import Varlen, as_varlen
from kop_triton.ops._checks import check_cu_seqlens
from test_no_host_sync import HostReads   # forward and backward

LENS = [1, 64, 65, 200, 3]


def _cu(lens, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("BT", [16, 64, 128])
def test_chunk_tables_walk_every_sequence(dtype, BT):
    s = Varlen(_cu(LENS, dtype))
    assert (s.N, s.lengths, s.max_len, s.cu_host[-1]) == (5, LENS, 200, sum(LENS))
    NC, idx, offs = s.chunk_tables(BT)
    want_idx, want_offs = [], [0]
    for n, L in enumerate(LENS):
        nt = -(-L // BT)
        want_idx += [[n, c] for c in range(nt)]
        want_offs.append(want_offs[-1] + nt)
    assert NC == len(want_idx) and idx.dtype == torch.int32 and offs.dtype == torch.int64
    assert idx.tolist() == want_idx and offs.tolist() == want_offs
    assert s.max_chunks(BT) == -(-200 // BT)
    assert s.chunk_tables(BT)[1] is idx                                 # cached per chunk size


@pytest.mark.parametrize("BT,extra,fixed", [(64, 0, None), (16, 3, None), (16, 0, 7), (64, 0, 130)])
def test_block_tables_walk_every_sequence(BT, extra, fixed):
    s = Varlen(_cu(LENS))
    tab = s.block_table(BT, extra, fixed)
    want = [[n, b] for n, L in enumerate(LENS) for b in range(-(-(L + extra if fixed is None else fixed) // BT))]
    assert tab.dtype == torch.int32 and tab.tolist() == want
    assert s.block_table(BT, extra, fixed) is tab


def test_offsets_as_the_kernels_read_them():
    cu = _cu(LENS)
    s = Varlen(cu)
    assert s.offsets() is s.offsets() and s.offsets().dtype == torch.int32
    o64 = s.offsets("cpu", torch.int64)
    assert o64.dtype == torch.int64 and o64.tolist() == cu.tolist()
    assert as_varlen(None) is None and as_varlen(s) is s and as_varlen(cu).cu_host == s.cu_host


def test_the_check_builds_it_once():
    cu = _cu(LENS)
    s = check_cu_seqlens(cu, 1, sum(LENS), torch.device("cpu"))
    assert isinstance(s, Varlen) and s.cu is cu and s.N == 5
    assert check_cu_seqlens(cu, 1, sum(LENS), torch.device("cpu"), s) is s          # read already: as is
    assert check_cu_seqlens(None, 2, 5, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="strictly increasing"):
        check_cu_seqlens(torch.tensor([0, 3, 3, 5]), 1, 5, torch.device("cpu"))


@pytest.mark.skipif(not TRITON_OK, reason=NEEDS_TRITON)
@pytest.mark.parametrize("op", ["scan", "conv", "k2", "k2-states-bf16"])
def test_packed_sequences_read_cu_seqlens_once(op):
    """Forward and backward through the Triton paths (launches recorded): one host read of
    cu_seqlens, the argument check's."""
    from kop_triton.kernels.launch import recording
    g = torch.Generator().manual_seed(0)
    cu = _cu([10, 30, 1, 29])
    dt = torch.bfloat16 if "bf16" in op else torch.float32
    x = torch.randn(1, 70, 8, generator=g).to(dt).requires_grad_()
    q = torch.randn(1, 70, 3, generator=g).to(dt).requires_grad_()
    gamma = torch.tensor([0.5, 0.9, 1.0], requires_grad=True)
    w = torch.randn(5, generator=g, requires_grad=True)
    u = torch.randn(8, 3, generator=g, requires_grad=True)
    alpha, gl = torch.ones(3, requires_grad=True), torch.tensor(0.1, requires_grad=True)
    st = (torch.zeros(4, 3, 8, requires_grad=True), torch.zeros(4, 4, 8, requires_grad=True)) if "states" in op else None
    with recording() as rec, HostReads() as reads:
        if op == "scan":
            outs = decayed_scan(q, q, x, gamma, output_final_state=True, backend="triton", cu_seqlens=cu)
        elif op == "conv":
            outs = causal_conv(x, w, output_final_state=True, backend="triton", cu_seqlens=cu)
        else:
            y, fin = k2_mixer(x, u, u, alpha, gamma, w, gl, initial_state=st, output_final_state=True,
                              backend="triton", cu_seqlens=cu)
            outs = (y, *fin)
        sum(o.float().sum() for o in outs).backward()
    assert len(rec.launches) >= 3
    assert len(reads.hits) == 1 and "_checks.py" in reads.hits[0], reads.hits
