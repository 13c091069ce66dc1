"""The per-op tunables (kernels/settings.py: ScanSettings, ConvSettings, K2Settings): their documented
defaults, clear errors for bad values, and a replaced value reaching the launches it chooses
(recorded with ``kop_triton.kernels.launch.recording``: nothing runs, the launch arguments are
checked).  What the forced paths compute is checked against the references in test_scan.py,
test_conv.py, test_k2.py and test_flat_grids.py, which force them through these objects."""
import dataclasses

import pytest
import torch

from helpers import NEEDS_TRITON, TRITON_OK
from kop_triton import causal_conv, decayed_scan, k2_mixer
from kop_triton.kernels.settings import CONV, K2, SCAN, ConvSettings, K2Settings, ScanSettings

needs_triton = pytest.mark.skipif(not TRITON_OK, reason=NEEDS_TRITON)


def test_documented_defaults():
    """The defaults their comments document (and benchmarks/traffic.py reads)."""
    assert dataclasses.astuple(SCAN) == (128, 16, 8, 256, None)
    assert dataclasses.astuple(CONV) == (32, 512)
    assert (K2.max_fused_r, K2.max_fused_taps, K2.fuse_weight_grads, K2.dx_target_programs, K2.max_dx_group,
            K2.dx_group, K2.fold_min_chunks, K2.fold_qk) == (32, 64, None, 1024, 32, None, 132, None)
    assert K2.scan == SCAN and K2.conv == CONV
    assert ScanSettings() == SCAN and ConvSettings() == CONV and K2Settings() == K2
    from benchmarks import traffic
    assert (traffic.PASS_BLOCK, traffic.PASS_CHUNKS, traffic.PASS_MAX_STEPS, traffic.PASS_LEVEL_PROGRAMS) == \
        (SCAN.pass_block, SCAN.pass_chunks, SCAN.pass_max_steps, SCAN.pass_level_programs)
    assert (traffic.MAX_FUSED_R, traffic.MAX_FUSED_TAPS, traffic.DX_TARGET, traffic.MAX_GROUP, traffic.DW_PROGRAMS) == \
        (K2.max_fused_r, K2.max_fused_taps, K2.dx_target_programs, K2.max_dx_group, CONV.dw_programs)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SCAN.pass_chunks = 2


@pytest.mark.parametrize("cls,field,value,want", [
    (ScanSettings, "pass_block", 100, r"ScanSettings\.pass_block must be a power of two in \[16, 1024\], got 100"),
    (ScanSettings, "pass_block", 8, r"ScanSettings\.pass_block must be a power of two in \[16, 1024\], got 8"),
    (ScanSettings, "pass_chunks", 3, r"ScanSettings\.pass_chunks must be a power of two in \[1, 128\], got 3"),
    (ScanSettings, "pass_chunks", 0, r"ScanSettings\.pass_chunks must be a power of two in \[1, 128\], got 0"),
    (ScanSettings, "pass_max_steps", 0, r"ScanSettings\.pass_max_steps must be an int >= 1, got 0"),
    (ScanSettings, "pass_level_programs", 2.5, r"ScanSettings\.pass_level_programs must be an int >= 1, got 2\.5"),
    (ScanSettings, "pass_group", -1, r"ScanSettings\.pass_group must be an int >= 0 or None, got -1"),
    (ScanSettings, "pass_group", True, r"ScanSettings\.pass_group must be an int >= 0 or None, got True"),
    (ConvSettings, "dot_min_taps", -1, r"ConvSettings\.dot_min_taps must be an int >= 0, got -1"),
    (ConvSettings, "dw_programs", "512", r"ConvSettings\.dw_programs must be an int >= 1, got '512'"),
    (K2Settings, "max_fused_r", 256, r"K2Settings\.max_fused_r must be an int in \[0, 128\], got 256"),
    (K2Settings, "max_fused_taps", -1, r"K2Settings\.max_fused_taps must be an int in \[0, 4096\], got -1"),
    (K2Settings, "fuse_weight_grads", 1, r"K2Settings\.fuse_weight_grads must be None, True or False, got 1"),
    (K2Settings, "dx_target_programs", 0, r"K2Settings\.dx_target_programs must be an int >= 1, got 0"),
    (K2Settings, "max_dx_group", 0, r"K2Settings\.max_dx_group must be an int >= 1, got 0"),
    (K2Settings, "dx_group", 0, r"K2Settings\.dx_group must be an int >= 1 or None, got 0"),
    (K2Settings, "fold_min_chunks", 0, r"K2Settings\.fold_min_chunks must be an int >= 1, got 0"),
    (K2Settings, "fold_qk", "yes", r"K2Settings\.fold_qk must be None, True or False, got 'yes'"),
    (K2Settings, "scan", CONV, r"K2Settings\.scan must be a ScanSettings, got ConvSettings"),
    (K2Settings, "conv", None, r"K2Settings\.conv must be a ConvSettings, got None"),
])
def test_bad_values_are_clear_errors(cls, field, value, want):
    with pytest.raises(ValueError, match=want):
        cls(**{field: value})
    with pytest.raises(ValueError, match=want):                  # replace() checks too
        dataclasses.replace(cls(), **{field: value})


def test_wrong_settings_class_is_a_clear_error():
    q, v, g = torch.randn(1, 4, 2), torch.randn(1, 4, 3), torch.tensor([0.5, 0.9])
    with pytest.raises(TypeError, match=r"settings must be a kop_triton\.kernels\.settings\.ScanSettings .*got "
                                        r"ConvSettings"):
        decayed_scan(q, q, v, g, settings=CONV)
    with pytest.raises(TypeError, match=r"settings must be a kop_triton\.kernels\.settings\.ConvSettings .*got dict"):
        causal_conv(v, torch.ones(2), settings={"dot_min_taps": 0})
    u, a, gl = torch.randn(3, 2), torch.ones(2), torch.tensor(0.1)
    with pytest.raises(TypeError, match=r"settings must be a kop_triton\.kernels\.settings\.K2Settings .*got "
                                        r"ScanSettings"):
        k2_mixer(v, u, u, a, g, torch.ones(2), gl, settings=SCAN)


def _record(fn):
    """The launches of fn() (forward and backward), recorded, by kernel name -> list of kwargs."""
    from kop_triton.kernels.launch import recording
    with recording() as rec:
        fn()
    out = {}
    for ln in rec.launches:
        out.setdefault(ln.name, []).append(ln.kwargs)
    return out


def _scan_call(settings, T=300, cu=None):
    def run():
        q = torch.randn(1, T, 3, requires_grad=True)
        v = torch.randn(1, T, 5, requires_grad=True)
        o, s = decayed_scan(q, q, v, torch.tensor([0.5, 0.9, 1.0]), output_final_state=True, backend="triton",
                            cu_seqlens=cu, settings=settings)
        (o.sum() + s.sum()).backward()
    return run


@needs_triton
def test_scan_settings_reach_the_state_pass():
    base = _record(_scan_call(None))
    assert {kw["CB"] for kw in base["_state_pass_kernel"]} == {16}
    assert {kw["BLOCK"] for kw in base["_state_pass_kernel"]} == {128}
    assert "_group_sum_kernel" not in base
    got = _record(_scan_call(dataclasses.replace(SCAN, pass_chunks=2, pass_block=64, pass_group=3)))
    assert {kw["CB"] for kw in got["_state_pass_kernel"]} == {2}
    assert {kw["BLOCK"] for kw in got["_state_pass_kernel"]} == {64}
    assert [kw["G"] for kw in got["_group_sum_kernel"]] == [3, 3]                  # forward and backward
    assert [kw["G"] for kw in got["_group_apply_kernel"]] == [3, 3]
    # the rule's thresholds: past pass_max_steps steps on few programs, groups (G a power of two >= pass_chunks)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    got = _record(_scan_call(dataclasses.replace(SCAN, pass_chunks=1, pass_max_steps=2), cu=cu))
    assert [kw["G"] for kw in got["_group_sum_kernel"]] == [2, 2]                  # 4 chunks: sqrt -> 2
    got = _record(_scan_call(dataclasses.replace(SCAN, pass_chunks=1, pass_max_steps=2, pass_level_programs=1),
                             cu=cu))
    assert "_group_sum_kernel" not in got


@needs_triton
def test_conv_settings_reach_the_launches():
    def call(settings, K=5):
        def run():
            x = torch.randn(2, 100, 8, requires_grad=True)
            w = torch.randn(K, requires_grad=True)
            y, _ = causal_conv(x, w, backend="triton", settings=settings)
            y.sum().backward()
        return run
    assert {kw["USE_DOT"] for kw in _record(call(None))["_conv_fwd_kernel"]} == {False}
    got = _record(call(dataclasses.replace(CONV, dot_min_taps=0)))
    assert {kw["USE_DOT"] for kw in got["_conv_fwd_kernel"] + got["_conv_bwd_dx_kernel"]} == {True}
    got = _record(call(dataclasses.replace(CONV, dot_min_taps=10 ** 9), K=40))
    assert {kw["USE_DOT"] for kw in got["_conv_fwd_kernel"] + got["_conv_bwd_dx_kernel"]} == {False}
    # the weight gradient's programs: NS time splits of its (NS, K, D) partial sums
    assert _record(call(None))["_conv_bwd_dw_kernel"][0]["dw_part"].shape[0] == 4    # all 2 x 2 time blocks
    got = _record(call(dataclasses.replace(CONV, dw_programs=2)))
    assert got["_conv_bwd_dw_kernel"][0]["dw_part"].shape[0] == 2


def _k2_call(settings, dtype=torch.float32, K=5, T=200):
    def run():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, T, 8, generator=g).to(dtype).requires_grad_()
        u = torch.randn(8, 3, generator=g, requires_grad=True)
        y, _ = k2_mixer(x, u, u, torch.ones(3, requires_grad=True), torch.tensor([0.5, 0.9, 1.0], requires_grad=True),
                        torch.randn(K, generator=g, requires_grad=True), torch.tensor(0.1, requires_grad=True),
                        backend="triton", settings=settings)
        y.float().sum().backward()
    return run


@needs_triton
def test_k2_settings_reach_the_launches():
    base = _record(_k2_call(None))
    (dx,) = base["_k2_dx_kernel"]
    assert (dx["FUSE_DUV"], dx["FUSE_DW"], dx["G"]) == (False, False, 1)      # fp32: separate passes
    assert "_conv_bwd_dw_kernel" in base
    (dx,) = _record(_k2_call(None, dtype=torch.bfloat16))["_k2_dx_kernel"]
    assert (dx["FUSE_DUV"], dx["FUSE_DW"]) == (True, True)                    # 16-bit: summed in the kernel
    got = _record(_k2_call(dataclasses.replace(K2, fuse_weight_grads=True, dx_group=3)))
    (dx,) = got["_k2_dx_kernel"]
    assert (dx["FUSE_DUV"], dx["FUSE_DW"], dx["G"]) == (True, True, 3)
    assert "_conv_bwd_dw_kernel" not in got
    (dx,) = _record(_k2_call(dataclasses.replace(K2, max_fused_taps=4, max_fused_r=0),
                             dtype=torch.bfloat16))["_k2_dx_kernel"]
    assert (dx["FUSE_DUV"], dx["FUSE_DW"]) == (False, False)                  # K = 5 > 4, BR = 16 > 0
    # dx_target_programs / max_dx_group: 2 x 4 chunks, 1 channel block
    (dx,) = _record(_k2_call(dataclasses.replace(K2, dx_target_programs=2, max_dx_group=3)))["_k2_dx_kernel"]
    assert dx["G"] == 3                                                       # min(3, 8 // 2)
    # the scan's and the conv's settings inside K2Settings
    got = _record(_k2_call(dataclasses.replace(K2, scan=dataclasses.replace(SCAN, pass_chunks=4),
                                               conv=dataclasses.replace(CONV, dot_min_taps=0))))
    assert {kw["CB"] for kw in got["_state_pass_kernel"]} == {4}
    assert {kw["CONV_DOT"] for kw in got["_k2_out_kernel"] + got["_k2_dx_kernel"]} == {True}
    assert {kw["CONV_DOT"] for kw in base["_k2_out_kernel"] + base["_k2_dx_kernel"]} == {False}
    # the folded projection (q, k and the chunk states in one launch), forced on and off
    assert "_k2_qk_state_kernel" not in base and "_k2_qk_kernel" in base
    got = _record(_k2_call(dataclasses.replace(K2, fold_qk=True)))
    assert "_k2_qk_state_kernel" in got and "_k2_qk_kernel" not in got
    assert [kw["REVERSE"] for kw in got["_chunk_state_kernel"]] == [True]          # the backward's only
    got = _record(_k2_call(dataclasses.replace(K2, fold_min_chunks=1)))
    assert "_k2_qk_state_kernel" in got


@needs_triton
def test_k2_settings_under_compile_are_a_clear_error():
    """torch.compile runs k2_mixer's torch.library op, which takes the defaults only."""
    args = [torch.randn(1, 8, 4), torch.randn(4, 2), torch.randn(4, 2), torch.ones(2), torch.tensor([0.5, 0.9]),
            torch.ones(3), torch.tensor(0.1)]
    bad = dataclasses.replace(K2, dx_group=2)
    f = torch.compile(lambda *a: k2_mixer(*a, backend="triton", settings=bad)[0], backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"settings=\.\.\.\) other than the defaults .* not supported under "
                                        r"torch\.compile"):
        f(*args)
