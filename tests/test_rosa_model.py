"""The K-Stack's ROSA branch: the model against a block-by-block composition from the spec
(naive mixer), parallel vs streaming (unbounded and per-window), gradients, the converter's ROSA
import, and the released ROSA checkpoints' scores (chunked CPU path; a prefix through Triton)."""

import pytest
import torch

from helpers import SHARED, assert_close
from kop_triton import KStackConfig, KStackLM
from kop_triton.checkpoint import load_checkpoint
from kop_triton.convert import ConvertError, convert
from kop_triton.data import BatchSampler
from kop_triton.eval import evaluate, validation_ids
from kop_triton.modules import K2Block, ROSA_RHO_INIT
from kop_triton.ops.k2 import k2_mixer
from kop_triton.rosa import RosaStream, rosa_next_ids
from test_convert import TEXT, save_reference
from test_module_koperator import triton_k2_missing

REF_DIR = SHARED / "reference" / "k-language-model-v2"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"


def _model(rosa="exact", **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=6, d_model=12, emb_dim=8, n_k2=3, rank=3, kernel_size=4, backend="chunked", rosa=rosa)
    cfg.update(kw)
    m = KStackLM(KStackConfig(**cfg)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _ids(B=2, T=50, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    x[:, T // 2:] = x[:, :T - T // 2]              # a repeat: long ROSA matches
    return x


def compose_from_spec(m, ids, rosa_ids):
    """The model computed block by block from SPEC section 2 plus the ROSA term (naive mixer)."""
    c = m.config
    h = m.emb_proj(m.emb(ids))
    rosa_h = m.rosa_proj(m.rosa_emb(rosa_ids + 1))                       # (B, T, D)
    for blk in m.stack.blocks:
        if isinstance(blk, K2Block):
            mx = blk.mixer
            x = blk.norm1(h)
            y, _ = k2_mixer(x, mx.u, mx.v, mx.alpha(), mx.gamma(), m.stack.shared_kernel, mx.gate_logit,
                            backend="naive")
            if blk.rho_logit is not None:
                y = y + torch.sigmoid(blk.rho_logit) * rosa_h
            h = h + mx.proj(y)
            h = h + blk.mlp(blk.norm2(h))
        else:
            h = blk(h)
    return m.logits_from_hidden(m.norm(h)) if c.head == "linear" else None


@pytest.mark.parametrize("mode", ["exact", "reference"])
@pytest.mark.parametrize("layers", [None, [1]], ids=["all-layers", "layer-1"])
def test_model_matches_the_spec_composition(mode, layers):
    m = _model(mode, rosa_layers=layers)
    assert [b.rho_logit is not None for b in m.stack.k2_blocks()] == [layers is None or i in layers for i in range(3)]
    ids = _ids()
    r = rosa_next_ids(ids, mode)
    assert_close("logits", m(ids), compose_from_spec(m, ids, r), 1e-10)
    assert torch.equal(m(ids, rosa_ids=r), m(ids))
    assert torch.equal(m.compute_rosa(ids), r)
    off = _model("off")
    assert off.rosa_emb is None and all(b.rho_logit is None for b in off.stack.k2_blocks())


@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_streaming_matches_parallel(mode):
    m = _model(mode, refine_steps=1)
    ids = _ids(T=60)
    full = m(ids)
    logits, state = m.prefill(ids[:, :17])
    assert isinstance(state[-1], RosaStream) and len(state) == 3 + 1
    outs = [logits]
    for t in range(17, 60):
        logits, state = m.step(ids[:, t], state)
        outs.append(logits)
    assert_close("step vs forward", torch.stack(outs, 1), full[:, 16:], 1e-10)
    # one step from no state = the first position
    assert_close("first step", m.step(ids[:, 0])[0], full[:, 0], 1e-10)


def test_streaming_per_window_reset_matches_per_window_rosa():
    """rosa_window W: the automata restart every W tokens (the K2 states do not), so the stream
    equals the parallel model given each window's own ROSA ids, as the reference scores them."""
    m = _model("reference")
    ids = _ids(T=70)
    W = 25
    per_window = torch.cat([rosa_next_ids(ids[:, i:i + W], "reference") for i in range(0, 70, W)], 1)
    assert not torch.equal(per_window, rosa_next_ids(ids, "reference"))
    full = m(ids, rosa_ids=per_window)
    logits, state = m.prefill(ids[:, :10], rosa_window=W)
    outs = [logits]
    for t in range(10, 70):
        logits, state = m.step(ids[:, t], state)
        outs.append(logits)
    assert_close("per-window stream", torch.stack(outs, 1), full[:, 9:], 1e-10)


def test_generate_with_rosa_is_greedy_over_the_whole_history():
    m = _model("exact")
    prompt = _ids(B=1, T=12)
    out = m.generate(prompt, 15, temperature=0)
    seq = prompt
    for _ in range(15):                            # recompute everything each token
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_gradients_reach_the_rosa_parameters():
    m = _model("exact", rosa_layers=[0, 2]).float().train()
    ids = _ids()
    m(ids, ids.roll(-1, 1)).backward()
    assert m.rosa_emb.weight.grad.abs().sum() > 0 and m.rosa_proj.weight.grad.abs().sum() > 0
    rho = [b.rho_logit for b in m.stack.k2_blocks()]
    assert rho[0].grad != 0 and rho[1] is None and rho[2].grad != 0
    assert m.stack.k2_blocks()[0].rho_logit.detach().item() != ROSA_RHO_INIT   # perturbed by _model


def test_config_and_argument_errors():
    with pytest.raises(ValueError, match="KStackConfig.rosa must be one of"):
        KStackConfig(vocab_size=5, rosa="approx")
    with pytest.raises(ValueError, match="rosa_layers"):
        KStackConfig(vocab_size=5, n_k2=2, rosa="exact", rosa_layers=[2])
    with pytest.raises(ValueError, match="rosa_layers"):
        KStackConfig(vocab_size=5, n_k2=2, rosa="exact", rosa_layers=[0, 0])
    m, off = _model("exact"), _model("off")
    ids = _ids()
    with pytest.raises(ValueError, match="rosa_ids must be an int32/int64 tensor of the ids. shape"):
        m(ids, rosa_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="stateless"):
        m.hidden(ids, return_state=True, rosa_ids=rosa_next_ids(ids))
    with pytest.raises(ValueError, match="ROSA off"):
        off(ids, rosa_ids=rosa_next_ids(ids))
    with pytest.raises(ValueError, match="no ROSA weights"):
        off.set_rosa("exact")
    with pytest.raises(ValueError, match="rosa mode"):
        m.set_rosa("off")


def test_sampler_returns_rosa_ids():
    chars = sorted(set(TEXT))
    ids = torch.tensor([chars.index(c) for c in TEXT * 3])
    s = BatchSampler(ids, 40, 4, seed=1, rosa="reference", vocab_size=len(chars))
    x, y, r = s.batch(3)
    assert torch.equal(r, rosa_next_ids(x, "reference")) and torch.equal(x, BatchSampler(ids, 40, 4, 1).batch(3)[0])
    with pytest.raises(ValueError, match="vocab_size"):
        BatchSampler(ids, 40, 4, seed=1, rosa="exact")


# ---------------------------------------------------------------------------- converter


def test_convert_rosa_round_trip_and_flag_rules(tmp_path):
    torch.manual_seed(0)
    m = KStackLM(KStackConfig(vocab_size=len(set(TEXT)), d_model=8, emb_dim=6, n_k2=3, rank=3, kernel_size=4,
                              gamma_min=0.1, alpha_cap=2.0, backend="chunked", rosa="reference", rosa_layers=[0, 2]))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.eval()
    save_reference(tmp_path / "src.pt", m)
    (tmp_path / "t.txt").write_text(TEXT)
    kw = dict(tokenizer="char", text=tmp_path / "t.txt", gamma_min=0.1, alpha_cap=2.0)
    with pytest.raises(ConvertError, match="trained ROSA weights .*layers \\[0, 2\\].*--rosa reference"):
        convert(tmp_path / "src.pt", tmp_path / "a", **kw)
    m2, tok = convert(tmp_path / "src.pt", tmp_path / "a", rosa="reference", **kw)
    assert (m2.config.rosa, m2.config.rosa_layers) == ("reference", [0, 2])
    m3, _ = load_checkpoint(tmp_path / "a")
    m3.set_backend("chunked")
    ids = torch.tensor([tok.encode(TEXT[:60])])
    assert torch.equal(m3(ids), m(ids))
    m4, _ = convert(tmp_path / "src.pt", tmp_path / "b", rosa="off", **kw)
    assert m4.config.rosa == "off" and m4.rosa_emb is None
    off = KStackLM(KStackConfig(vocab_size=len(set(TEXT)), d_model=8, n_k2=1, rank=3, kernel_size=4,
                                gamma_min=0.1, alpha_cap=2.0))
    save_reference(tmp_path / "off.pt", off)
    with pytest.raises(ConvertError, match="never trained"):
        convert(tmp_path / "off.pt", tmp_path / "c", rosa="exact", **kw)
    assert convert(tmp_path / "off.pt", tmp_path / "c", **kw)[0].config.rosa == "off"


# ---------------------------------------------------------------------------- released checkpoints

needs_release = pytest.mark.skipif(
    not (SHAKESPEARE.is_file() and (REF_DIR / "char_shakespeare_v2.pt").is_file()
         and (REF_DIR / "char_shakespeare_v2_rosa_cpp.pt").is_file()),
    reason=f"the ROSA reference checkpoints or Tiny Shakespeare are not under {SHARED}")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = {}
    for name in ("char_shakespeare_v2", "char_shakespeare_v2_rosa_cpp"):
        d = tmp_path_factory.mktemp(name) / "ck"
        convert(REF_DIR / f"{name}.pt", d, tokenizer="char", text=SHAKESPEARE, gamma_min=0.05, alpha_cap=1.0,
                rosa="reference")
        out[name] = d
    return out


@needs_release
@pytest.mark.parametrize("name,mode,expected", [
    ("char_shakespeare_v2", "reference", 1.40229),
    ("char_shakespeare_v2", "exact", 1.40160),
    ("char_shakespeare_v2_rosa_cpp", "reference", 1.39543),
], ids=["v2-reference", "v2-exact", "cpp-reference"])
def test_released_rosa_checkpoint_scores(released, name, mode, expected):
    """The scores the reference's own model code gives (shared README), whole validation set,
    2048-token windows, ROSA from each window's ids, chunked CPU path."""
    m, tok = load_checkpoint(released[name])
    assert m.num_parameters() == 178_692
    m.set_backend("chunked")
    m.set_rosa(mode)
    ids = validation_ids(tok, SHAKESPEARE.read_text(encoding="utf-8"), 0.1)
    res = evaluate(m, ids, window=2048, batch_size=8)
    assert res["tokens"] == 54 * 2048
    assert abs(res["val_ce"] - expected) <= 5e-4, res


@needs_release
@pytest.mark.skipif(triton_k2_missing() is not None, reason=str(triton_k2_missing()))
def test_released_rosa_checkpoint_triton_matches_chunked(released):
    from helpers import assert_triton_matches_chunked
    assert_triton_matches_chunked(released["char_shakespeare_v2"], SHAKESPEARE.read_text(encoding="utf-8"), 160)
