"""Bad input to the Python API as a new user gives it (issue 13): each one a clear error that names
the argument and what it got, at the first call that can tell, or (dtypes) a documented behaviour."""
import numpy as np
import pytest
import torch

from kop_triton import KOperator, KStackConfig, KStackLM, causal_conv, decayed_scan, k2_mixer


def _scan_inputs(dtype=torch.float32, B=2, T=9, R=3, D=5):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, R, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, D, generator=g, dtype=dtype)
    gamma = torch.rand(R, generator=g, dtype=torch.float64) * 0.5 + 0.4
    return q, k, v, gamma


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return KStackLM(KStackConfig(vocab_size=11, d_model=8, n_k2=1, rank=2, kernel_size=3)).eval()


# ---- token ids ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [11, 40, -1, -7])
def test_out_of_vocabulary_or_negative_ids_name_the_argument_and_the_range(lm, bad):
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=r"ids must hold token ids in \[0, vocab_size=11\), got values in "):
        lm(ids)
    with pytest.raises(ValueError, match=rf"ids .*\[0, vocab_size=11\).*\[{bad}\]"):
        lm(ids, torch.zeros_like(ids))
    with pytest.raises(ValueError, match=r"ids must hold token ids in \[0, vocab_size=11\)"):
        lm.generate(ids, 3)                                              # a generate prompt
    with pytest.raises(ValueError, match=r"ids_t must hold token ids in \[0, vocab_size=11\)"):
        lm.step(torch.tensor([bad]))
    assert lm.generate(torch.tensor([[1, 2, 10, 0]]), 2).shape == (1, 6)  # the edges of the range are fine


# ---- the ops -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["naive", "recurrent", "chunked"])
def test_float64_gamma_with_float32_inputs_gives_float32_states(backend):
    q, k, v, gamma = _scan_inputs()
    o, s = decayed_scan(q, k, v, gamma, output_final_state=True, backend=backend)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    o32, s32 = decayed_scan(q, k, v, gamma.float(), output_final_state=True, backend=backend)
    torch.testing.assert_close(o, o32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, s32, rtol=1e-6, atol=1e-6)
    gamma.requires_grad_(True)
    decayed_scan(q, k, v, gamma, backend=backend)[0].sum().backward()
    assert gamma.grad.dtype == torch.float64                             # the gradient in gamma's own dtype
    x = torch.randn(2, 9, 5)
    y, c = causal_conv(x, torch.rand(4, dtype=torch.float64), output_final_state=True)
    assert y.dtype == c.dtype == torch.float32


def test_causal_conv_rejects_16_bit_states_as_decayed_scan_does():
    q, k, v, gamma = _scan_inputs()
    with pytest.raises(TypeError, match="initial_state must be float32"):
        decayed_scan(q, k, v, gamma, initial_state=torch.zeros(2, 3, 5, dtype=torch.bfloat16))
    x = torch.randn(2, 9, 5)
    for dt in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match=r"initial_state must be a float tensor of dtype float32 \(or float64\)"):
            causal_conv(x, torch.rand(4), initial_state=torch.zeros(2, 3, 5, dtype=dt))


def test_output_final_state_must_be_a_bool():
    q, k, v, gamma = _scan_inputs()
    x = torch.randn(2, 9, 5)
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="output_final_state must be a bool"):
            decayed_scan(q, k, v, gamma, output_final_state=bad)
        with pytest.raises(TypeError, match="output_final_state must be a bool"):
            causal_conv(x, torch.rand(4), output_final_state=bad)
        for backend in ("chunked", "naive"):
            with pytest.raises(TypeError, match="output_final_state must be a bool"):
                k2_mixer(x, torch.randn(5, 3), torch.randn(5, 3), torch.ones(3), torch.full((3,), 0.9),
                         torch.rand(4), torch.zeros(1), output_final_state=bad, backend=backend)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        KOperator(5, rank=3, kernel_size=4)(x, return_state="no")


def test_a_numpy_state_is_named_not_compared_by_device():
    q, k, v, gamma = _scan_inputs()
    with pytest.raises(TypeError, match="initial_state must be a torch.Tensor, got ndarray"):
        decayed_scan(q, k, v, gamma, initial_state=np.zeros((2, 3, 5), dtype=np.float32))
    x = torch.randn(2, 9, 5)
    with pytest.raises(TypeError, match="initial_state must be a torch.Tensor, got ndarray"):
        causal_conv(x, torch.rand(4), initial_state=np.zeros((2, 3, 5), dtype=np.float32))
    u, w = torch.randn(5, 3), torch.randn(5, 3)
    with pytest.raises(TypeError, match="initial_state must be a torch.Tensor, got ndarray"):
        k2_mixer(x, u, w, torch.ones(3), gamma.float(), torch.rand(4), torch.zeros(()),
                 initial_state=(np.zeros((2, 3, 5), dtype=np.float32), None))


# ---- KOperator -----------------------------------------------------------------------------

def test_koperator_constructor_names_its_arguments():
    with pytest.raises(TypeError, match="gamma_min must be a real number, got str 'a'"):
        KOperator(8, gamma_min="a")
    with pytest.raises(TypeError, match="alpha_cap must be a real number"):
        KOperator(8, alpha_cap=None)
    with pytest.raises(ValueError, match=r"kernel_size must be an int in \[1, 4096\], got 1000000"):
        KOperator(8, kernel_size=10 ** 6)
    with pytest.raises(ValueError, match="KStackConfig.kernel_size must be an int in"):
        KStackConfig(vocab_size=5, kernel_size=10 ** 6)
    assert KOperator(8, gamma_min=np.float64(0.1), kernel_size=4096).kernel_size == 4096


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_koperator_input_of_another_dtype_without_autocast(dtype):
    m = KOperator(6, rank=2, kernel_size=3)
    with pytest.raises(TypeError, match=rf"x has dtype {dtype} but this KOperator's parameters are torch.float32"):
        m(torch.randn(2, 5, 6, dtype=dtype))
    with pytest.raises(TypeError, match=rf"x_t has dtype {dtype} but this KOperator's parameters are torch.float32"):
        m.step(torch.randn(2, 6, dtype=dtype))
    y = m.to(dtype)(torch.randn(2, 5, 6, dtype=dtype))                   # a module of that dtype runs it
    assert y.dtype == dtype


def test_koperator_step_state_must_be_two_tensors():
    m = KOperator(6, rank=2, kernel_size=3)
    x = torch.randn(2, 6)
    for bad in ([1, 2], (torch.zeros(2, 2, 6), 3), "ab", torch.zeros(2, 2, 6)):
        with pytest.raises(TypeError, match=r"state must be a KOperatorState \(scan \(2, 2, 6\), conv \(2, 2, 6\)\)"):
            m.step(x, bad)
    y, st = m.step(x, [torch.zeros(2, 2, 6), torch.zeros(2, 2, 6)])   # a list of two tensors is fine
    assert y.shape == (2, 6) and st.scan.shape == (2, 2, 6)
