"""The fast recurrent step (kop_triton.decode.PreparedStep, used by KStackLM.step for inference) against the
module step (KOperator.step through the blocks, the path autograd takes), in float64, for every
model variant; plan invalidation when weights change; argument checks."""
import pytest
import torch

from helpers import LM_CONFIGS, assert_close
from kop_triton import KStackConfig, KStackLM
from kop_triton.rosa import RosaStream

CONFIGS = {**LM_CONFIGS, "kernel-1": dict(vocab_size=13, d_model=8, n_k2=1, rank=1, kernel_size=1)}


def _model(name, dtype=torch.float64):
    torch.manual_seed(0)
    m = KStackLM(KStackConfig(**CONFIGS[name])).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():          # every weight away from its init (gains, biases, gates, decays)
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _module_step(m, ids_t, state):
    with torch.enable_grad():             # autograd on: KStackLM.step takes the module path
        assert m.prepared_step() is None
        logits, new = m.step(ids_t, state)
    return logits.detach(), tuple(s if isinstance(s, RosaStream) else type(s)(*(t.detach() for t in s)) for s in new)


@pytest.mark.parametrize("B", [1, 17], ids=["B1", "B17"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_step_equals_module_step(name, B):
    m = _model(name)
    ids = torch.randint(0, m.config.vocab_size, (B, 12))
    with torch.no_grad():
        _, state = m.prefill(ids[:, :5])
        ref_state = state
        assert m.prepared_step() is not None
        for t in range(5, 12):
            logits, state = m.step(ids[:, t], state)
            ref_logits, ref_state = _module_step(m, ids[:, t], ref_state)
            assert_close(f"logits t={t}", logits, ref_logits, 1e-12)
        for i, (a, b) in enumerate(zip(state, ref_state)):
            assert_close(f"scan state {i}", a.scan, b.scan, 1e-12)
            assert_close(f"conv state {i}", a.conv, b.conv, 1e-12)
        # from no state at all (zeros), as the module step
        logits, _ = m.step(ids[:, 0])
        assert_close("logits from zero state", logits, _module_step(m, ids[:, 0], None)[0], 1e-12)


def test_step_is_scripted():
    """The prepared step compiles with TorchScript (a silent fallback would only be slower)."""
    with torch.no_grad():
        assert isinstance(_model("default-linear").prepared_step().walk, torch.jit.ScriptModule)


def test_plan_follows_weight_changes():
    m = _model("default-linear")
    ids = torch.randint(0, 13, (2, 6))
    with torch.no_grad():
        _, state = m.prefill(ids)
        before, _ = m.step(ids[:, -1], state)
        m.mixers()[1].decay_logit.add_(1.0)                       # in place, as an optimiser step
        m.stack.blocks[0].mlp.up.bias.add_(0.5)
        after, _ = m.step(ids[:, -1], state)
        assert (after - before).abs().max() > 1e-3
        assert_close("after an in-place change", after, _module_step(m, ids[:, -1], state)[0], 1e-12)
        fresh = _model("default-linear")
        m.load_state_dict(fresh.state_dict())
        assert_close("after load_state_dict", m.step(ids[:, -1], state)[0],
                     _module_step(fresh, ids[:, -1], state)[0], 1e-12)
        m32 = m.float()                                           # .to(): a new plan in float32
        s32 = tuple(type(s)(*(t.float() for t in s)) for s in state)
        logits32, new32 = m32.step(ids[:, -1], s32)
        assert logits32.dtype == torch.float32 and new32[0].scan.dtype == torch.float32


def test_step_with_autograd_uses_the_module_path_and_has_gradients():
    m = _model("default-linear")
    m.train()
    assert m.prepared_step() is None
    logits, _ = m.step(torch.tensor([1, 2]))
    logits.sum().backward()
    assert all(p.grad is not None for p in m.mixers()[0].parameters() if p.requires_grad)


def test_plan_step_bad_state():
    m = _model("default-linear")
    with torch.no_grad():
        _, state = m.prefill(torch.randint(0, 13, (2, 4)))
        with pytest.raises(ValueError, match="tuple of 2 KOperatorState"):
            m.step(torch.tensor([1, 2]), state[:1])
        with pytest.raises(ValueError, match=r"state\[0\] must be a KOperatorState with scan \(3, 3, 12\)"):
            m.step(torch.tensor([1, 2, 3]), state)                # batch 3 against a batch-2 state
        with pytest.raises(ValueError, match="ids_t"):
            m.step(torch.tensor([[1, 2]]), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: host syncs and CUDA-graph capture of the step")
def test_cuda_step_has_no_host_sync_and_replays_in_a_cuda_graph():
    m = _model("default-linear", dtype=torch.float32).cuda()
    ids = torch.randint(0, 13, (4, 9), device="cuda")
    with torch.no_grad():
        _, state = m.prefill(ids)
        tok = ids[:, -1].clone()
        for _ in range(3):                                        # plan build and TorchScript profiling runs
            m.step(tok, state)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")                   # any host sync in the step raises
        try:
            logits, new = m.step(tok, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                m.step(tok, state)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_logits, g_new = m.step(tok, state)                 # static inputs: tok and state
        graph.replay()
        torch.cuda.synchronize()
    assert_close("CUDA graph logits", g_logits, logits, 1e-6)
    assert_close("CUDA graph scan state", g_new[0].scan, new[0].scan, 1e-6)


@pytest.mark.parametrize("window", [None, 4], ids=["unbounded", "window-4"])
def test_plan_step_with_rosa_equals_module_step(window):
    """A ROSA model on the fast step: the automaton advanced once per token (the RosaStream at the
    end of the state), the ROSA term added in the selected blocks only; == the module step."""
    torch.manual_seed(0)
    m = KStackLM(KStackConfig(vocab_size=7, d_model=12, n_k2=3, rank=3, kernel_size=4, rosa="exact",
                              rosa_layers=[0, 2])).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2, 3, 1, 2],
                        [5, 5, 5, 6, 5, 5, 6, 5, 5, 5, 6, 6, 5, 5]])
    with torch.no_grad():
        _, state = m.prefill(ids[:, :5], rosa_window=window)
        ref = state[:-1] + (state[-1].clone(),)
        assert m.prepared_step() is not None
        for t in range(5, ids.shape[1]):
            logits, state = m.step(ids[:, t], state)
            ref_logits, ref = _module_step(m, ids[:, t], ref)
            assert_close(f"logits t={t}", logits, ref_logits, 1e-12)
        full = m(ids)                                  # the parallel form over the whole sequence
    if window is None:
        assert_close("last step vs parallel form", logits, full[:, -1], 1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_is_one_script_module_and_step_lists_equals_step(name):
    """The whole step is one scripted module walking the blocks' prepared steps; ``step_lists``
    (the transformers cache's entry, states as lists, nothing checked) gives what ``step`` gives."""
    m = _model(name)
    ids = torch.randint(0, m.config.vocab_size, (3, 6))
    with torch.no_grad():
        _, state = m.prefill(ids)
        prep = m.prepared_step()
        assert isinstance(prep.walk, torch.jit.ScriptModule)
        logits, new = m.step(ids[:, -1], state)
        l2, scan, conv = prep.step_lists(ids[:, -1], [s.scan for s in state], [s.conv for s in state])
    assert torch.equal(logits, l2)
    assert all(torch.equal(a.scan, s) and torch.equal(a.conv, c) for a, s, c in zip(new, scan, conv))


def test_rosa_model_steps_through_the_same_scripted_walk():
    m = KStackLM(KStackConfig(vocab_size=7, d_model=8, n_k2=1, rank=2, kernel_size=3, rosa="exact")).eval()
    with torch.no_grad():
        m.step(torch.tensor([1]))
        assert isinstance(m.prepared_step().walk, torch.jit.ScriptModule)


def test_blocks_own_their_prepared_steps_and_no_block_math_is_copied():
    """decode.py walks the blocks' own prepared steps: it names no block class and folds no block weight."""
    import inspect
    from kop_triton import decode
    src = inspect.getsource(decode)
    for name in ("K1Block", "K2Block", "K0Block", "mlp", "mixer", "_k2_block", "__name__", "_rosa_step", "_step_plan"):
        assert name not in src.replace("K*Block", ""), name


def test_fingerprint_sees_data_edits_that_leave_the_version_counter():
    """p.data.mul_ / a swap of two values / a one-ulp change through .data bump no version counter; the
    fingerprint (checked once per generate call through valid(exact=True)) sees each, and is equal for
    an identical copy (so an unchanged model keeps its prepared step)."""
    from kop_triton.decode import fingerprint
    m = _model("default-linear")
    with torch.no_grad():
        prep = m.prepared_step()
        assert prep.valid(exact=True) and m.prepared_step(exact=True) is prep
        p = m.stack.blocks[0].mlp.up.weight
        clone = [q.detach().clone() for q in m.parameters()]
        assert torch.equal(fingerprint(clone), fingerprint(list(m.parameters())))
        edits = [lambda: p.data.mul_(0.9),
                 lambda: p.data.view(-1).__setitem__([0, 1], p.data.view(-1)[[1, 0]].clone()),
                 lambda: p.data.view(-1)[5].copy_(torch.nextafter(p.data.view(-1)[5], torch.tensor(1e9, dtype=p.dtype)))]
        for edit in edits:
            v = p._version
            edit()
            assert p._version == v                                  # invisible to the version counter
            assert prep.valid() and not prep.valid(exact=True)
            new = m.prepared_step(exact=True)
            assert new is not prep and new.valid(exact=True)
            prep = new


@pytest.mark.parametrize("name", ["default-linear", "gelu-head-refine"])
def test_prepared_step_holds_no_parameter_copy_beyond_its_folded_weights(name):
    """The prepared step keeps the live check's references to the parameters (not copies), its folded
    weights (the scripted walk's buffers) and a (n_params, 2) fingerprint: every other tensor it reaches
    would be memory held beside the model (an earlier value snapshot doubled the parameters)."""
    m = _model(name)
    with torch.no_grad():
        prep = m.prepared_step(exact=True)
    params = {id(p) for p in m.parameters()}
    folded = {t.untyped_storage().data_ptr() for t in prep.walk.buffers()}
    seen, found, todo = set(), [], [v for k, v in vars(prep).items() if k not in ("model_ref",)]
    while todo:
        x = todo.pop()
        if id(x) in seen or x is m or getattr(x, "__self__", None) is m:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, torch.nn.Module):                        # the walk (scripted or not) and its blocks
            found += list(x.buffers()) + list(x.parameters())
        elif isinstance(x, dict):
            todo += list(x.values())
        elif isinstance(x, (list, tuple)):
            todo += list(x)
        elif hasattr(x, "__self__"):                                 # a bound method: its object
            todo.append(x.__self__)
    extra = [t for t in found if id(t) not in params and t.untyped_storage().data_ptr() not in folded]
    assert len(extra) == 1 and extra[0] is prep.fingerprint, [tuple(t.shape) for t in extra]
    assert prep.fingerprint.shape == (len(params), 2) and prep.fingerprint.dtype == torch.int64
    assert not any(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                   for t in prep.walk.buffers() for p in m.parameters())   # folded: no alias of a live weight
