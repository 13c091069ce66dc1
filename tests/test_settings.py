"""The launch-settings table (kernels/settings.py): Triton version strings, which rule applies to
which version / target / dtype / R, and clear errors.  What the settings compile to is the offline
compile gate's (tests/test_gpu_compile.py, and the Triton 3.9 gate of ``make test``)."""
import pytest
import torch

from kop_triton.kernels import settings as S
from kop_triton.kernels.settings import kernel_settings, parse_version


@pytest.mark.parametrize("text,want", [("3.9.0", (3, 9)), ("3.6.0", (3, 6)), ("3.6.0+git1a2b3c4", (3, 6)),
                                       ("3.10.0rc1", (3, 10)), ("3.4", (3, 4)), (" 4.0.1.post2", (4, 0))])
def test_parse_version(text, want):
    assert parse_version(text) == want


def test_parse_version_rejects_garbage():
    with pytest.raises(ValueError, match=r"cannot read a Triton version from 'nightly'.*'3\.6\.0'"):
        parse_version("nightly")


def test_installed_version_is_parsed():
    import triton
    assert S.TRITON == parse_version(triton.__version__) and S.TRITON >= (3, 4)


def at(monkeypatch, version, arch):
    monkeypatch.setattr(S, "AS_FOR", {"triton": version, "arch": arch})


@pytest.mark.parametrize("version,arch,BD", [((3, 6), 80, 32), ((3, 8), 86, 32), ((3, 9), 80, 16), ((3, 10), 80, 16),
                                             ((3, 6), 90, 16), ((3, 9), 100, 16)])
def test_dx_fp32_channels_by_version_and_target(monkeypatch, version, arch, BD):
    """sm_80, fp32, R <= 32: 32 channels before Triton 3.9, 16 from it (ptxas spilled the other)."""
    at(monkeypatch, version, arch)
    assert kernel_settings("_k2_dx_kernel", torch.float32, R=16, D=1024) == \
        dict(BD=BD, BK=16, BRS=16, DIAG_LOOP=False, FUSE_DUV=True, num_warps=4)
    # R > 32 is not affected
    assert kernel_settings("_k2_dx_kernel", torch.float32, R=64, D=1024)["BD"] == 16


@pytest.mark.parametrize("version,dtype,R,loop", [((3, 6), torch.bfloat16, 16, False), ((3, 9), torch.bfloat16, 16, True),
                                                  ((3, 9), torch.float16, 32, True), ((3, 9), torch.float32, 16, False),
                                                  ((3, 6), torch.bfloat16, 64, True), ((3, 9), torch.bfloat16, 128, True)])
def test_dqk_diagonal_loop(monkeypatch, version, dtype, R, loop):
    at(monkeypatch, version, 90)
    assert kernel_settings("_bwd_dqk_kernel", dtype, R=R, D=64)["DIAG_LOOP"] is loop
    assert kernel_settings("_intra_A_kernel", dtype, R=R, D=64)["DIAG_LOOP"] is (R > 32)   # only dqk's changes


def test_settings_of_the_pinned_version_on_sm_90(monkeypatch):
    at(monkeypatch, (3, 6), 90)
    bf, f32 = torch.bfloat16, torch.float32
    assert kernel_settings("_chunk_out_kernel", bf, R=16, D=1024) == dict(BD=64, BK=16, num_warps=8)
    assert kernel_settings("_chunk_out_kernel", f32, R=128, D=1024) == dict(BD=32, BK=16, num_warps=8, num_stages=1)
    assert kernel_settings("_chunk_state_kernel", f32, R=16, D=1024) == dict(BD=64, BK=16, num_warps=8)
    assert kernel_settings("_bwd_dqk_kernel", bf, R=16, D=1024) == \
        dict(BRS=16, BD=32, DIAG_LOOP=False, num_warps=4, num_stages=2)
    # 16-bit: pipelined loads (2 stages) where D is a multiple of 16; 1 stage at D = 24 (it spilled)
    assert kernel_settings("_bwd_dqk_kernel", torch.float16, R=16, D=24)["num_stages"] == 1
    assert kernel_settings("_bwd_dqk_kernel", torch.float16, R=16, D=64)["num_stages"] == 2
    assert kernel_settings("_bwd_dqk_kernel", f32, R=16, D=64)["num_stages"] == 1
    assert kernel_settings("_bwd_dqk_kernel", f32, R=128, D=1024) == \
        dict(BRS=16, BD=16, DIAG_LOOP=True, num_warps=8, num_stages=2)
    assert kernel_settings("_state_pass_kernel", f32, R=128, D=1024) == dict(num_warps=8)
    assert kernel_settings("_k2_out_kernel", bf, R=128, D=1024) == \
        dict(BD=16, BK=16, BRS=16, DIAG_LOOP=True, num_warps=4)
    assert kernel_settings("_k2_out_kernel", f32, R=16, D=1024)["BD"] == 32
    assert kernel_settings("_k2_dx_kernel", bf, R=128, D=1024) == \
        dict(BD=16, BK=32, BRS=16, DIAG_LOOP=True, FUSE_DUV=True, num_warps=8)
    assert kernel_settings("_k2_qk_kernel", bf, R=128, D=1024) == dict(BM=16, BD=16, num_warps=8)
    assert kernel_settings("_conv_bwd_dw_kernel", bf, D=24, K=8) == dict(BT=64, BL=8, BD=32, num_warps=8)
    assert kernel_settings("_conv_bwd_dx_kernel", bf, D=24, K=8, dh0_only=True, use_dot=False)["BT"] == 16
    assert kernel_settings("_conv_bwd_dx_kernel", bf, D=24, K=8, dh0_only=False, use_dot=False)["BT"] == 64
    assert kernel_settings("_conv_bwd_dx_kernel", f32, D=256, K=64, dh0_only=False, use_dot=True) == \
        dict(BT=64, BS=64, BD=32, num_warps=8, num_stages=1)
    assert kernel_settings("_conv_bwd_dx_kernel", bf, D=256, K=64, dh0_only=False, use_dot=True)["BD"] == 64


@pytest.mark.parametrize("version", [(3, 6), (3, 9)])
def test_r32_settings(monkeypatch, version):
    """R = 32 (BR = 32), which the compile gate first covered on 12-06 (gate._edge_cases): the settings
    that stopped its spills."""
    at(monkeypatch, version, 90)
    f32, bf, fp16 = torch.float32, torch.bfloat16, torch.float16
    assert kernel_settings("_bwd_dqk_kernel", f32, R=32, D=24)["BRS"] == 16
    assert kernel_settings("_bwd_dqk_kernel", f32, R=16, D=24)["BRS"] == 16        # min(BR, 32) below
    assert kernel_settings("_bwd_dqk_kernel", bf, R=32, D=1024)["num_warps"] == 8
    assert kernel_settings("_bwd_dqk_kernel", fp16, R=20, D=24)["num_warps"] == 8
    assert kernel_settings("_bwd_dqk_kernel", bf, R=16, D=1024)["num_warps"] == 4
    assert kernel_settings("_k2_qk_kernel", f32, R=32, D=1024)["BD"] == 16
    assert kernel_settings("_k2_qk_kernel", bf, R=32, D=1024)["BD"] == 64
    assert {k: v for k, v in kernel_settings("_k2_out_kernel", f32, R=32, D=1024).items()
            if k in ("BD", "DIAG_LOOP")} == dict(BD=16, DIAG_LOOP=True)
    got = kernel_settings("_k2_dx_kernel", f32, R=32, D=1024)
    assert (got["num_warps"], got["DIAG_LOOP"]) == (8, True)
    assert kernel_settings("_k2_dx_kernel", fp16, R=32, D=1024)["BD"] == 16
    assert kernel_settings("_k2_dx_kernel", fp16, R=16, D=1024)["BD"] == 32
    # bf16 dq / dk at D not a multiple of 16: 16 channels a step under 3.9 only
    assert kernel_settings("_bwd_dqk_kernel", bf, R=16, D=24)["BD"] == (16 if version == (3, 9) else 32)
    assert kernel_settings("_bwd_dqk_kernel", bf, R=16, D=64)["BD"] == 32


@pytest.mark.parametrize("version", [(3, 6), (3, 9)])
def test_register_caps(monkeypatch, version):
    """bf16, R <= 16: _k2_dx without the fused x^T dp at 4 warps, capped at 168 regs (3 programs per
    SM) on sm_90 / sm_100 only for the gated plain specialisation; _k2_out capped at 64 (4 per SM)
    before Triton 3.9."""
    bf = torch.bfloat16
    for arch in (90, 100):
        at(monkeypatch, version, arch)
        assert kernel_settings("_k2_dx_kernel", bf, R=16, D=1024, plain=True) == \
            dict(BD=32, BK=16, BRS=16, DIAG_LOOP=False, FUSE_DUV=False, num_warps=4, maxnreg=168)
        assert "maxnreg" not in kernel_settings("_k2_dx_kernel", bf, R=16, D=1024, plain=False)
        for dt, R in ((torch.float16, 16), (bf, 32)):                                  # they spilled capped
            assert kernel_settings("_k2_dx_kernel", dt, R=R, D=1024, plain=True)["num_warps"] == 8
        assert kernel_settings("_k2_out_kernel", bf, R=16, D=1024, plain=True).get("maxnreg") == \
            (64 if version < (3, 9) else None)                                       # 3.9 spilled capped
        assert "maxnreg" not in kernel_settings("_k2_out_kernel", bf, R=16, D=1024, plain=False)
        assert "maxnreg" not in kernel_settings("_k2_out_kernel", torch.float16, R=16, D=1024, plain=True)
        assert "maxnreg" not in kernel_settings("_k2_out_kernel", bf, R=64, D=1024, plain=True)
        assert "maxnreg" not in kernel_settings("_k2_out_kernel", torch.float32, R=16, D=1024, plain=True)
        # fp32 and R > 32 keep the fused sums' setting (their launcher decides: fp32 unfused, R > 32 past MAX_FUSED_R)
        assert kernel_settings("_k2_dx_kernel", torch.float32, R=16, D=1024, plain=True)["FUSE_DUV"] is True
        assert "maxnreg" not in kernel_settings("_k2_dx_kernel", bf, R=64, D=1024, plain=True)
    at(monkeypatch, version, 80)
    got = kernel_settings("_k2_dx_kernel", bf, R=16, D=1024, plain=True)       # sm_80: as before
    assert (got["num_warps"], got["FUSE_DUV"], "maxnreg" in got) == (8, True, False)


def test_sm_80_dx_warps_and_stages(monkeypatch):
    for version in ((3, 6), (3, 9)):
        at(monkeypatch, version, 80)
        got = kernel_settings("_k2_dx_kernel", torch.float16, R=128, D=1024)
        assert (got["BK"], got["num_warps"], got["num_stages"]) == (16, 4, 2)
    at(monkeypatch, (3, 9), 90)
    assert "num_stages" not in kernel_settings("_k2_dx_kernel", torch.float16, R=128, D=1024)


def test_unknown_target_counts_as_sm_90(monkeypatch):
    monkeypatch.setattr(S, "AS_FOR", {"triton": (3, 6)})
    assert kernel_settings("_k2_dx_kernel", torch.float32, R=4, D=64, arch=None)["BD"] == 16
    assert kernel_settings("_k2_dx_kernel", torch.float32, R=4, D=64, arch=80)["BD"] == 32


def test_force(monkeypatch):
    monkeypatch.setattr(S, "FORCE", {"BD": 16, "BM": 32})
    assert kernel_settings("_chunk_state_kernel", torch.float32, R=4, D=1024)["BD"] == 16
    assert "BM" not in kernel_settings("_chunk_state_kernel", torch.float32, R=4, D=1024)   # only what a kernel has


def test_every_rule_names_known_kernels_and_says_why():
    for rule in S.RULES:
        assert set(rule.kernels) <= set(S.BASE), rule.kernels
        known = set().union(*(S.BASE[k] for k in rule.kernels)) | {"num_warps", "num_stages", "maxnreg"}
        assert set(rule.set) <= known, (rule.kernels, rule.set)       # no misspelt setting
        assert len(rule.why) > 20 and ("gate 12-02" in rule.why or "gate 12-06" in rule.why), rule.why


def test_clear_errors():
    with pytest.raises(ValueError, match=r"no launch settings for kernel '_nope'; known: \["):
        kernel_settings("_nope", torch.float32)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 inputs, got torch.int32"):
        kernel_settings("_chunk_out_kernel", torch.int32)
    # float64 inputs (the conv's Triton path takes them) run the fp32 code: the fp32 settings
    assert kernel_settings("_conv_bwd_dx_kernel", torch.float64, D=256, K=64, use_dot=True) == \
        kernel_settings("_conv_bwd_dx_kernel", torch.float32, D=256, K=64, use_dot=True)
