"""Importer of the reference implementation's v2 checkpoints: synthetic checkpoints in the
reference's layout (every head, shared and per-layer kernels), the released checkpoint from
../shared, safe loading, and one-line CLI errors."""
import datetime
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import SHARED, assert_cli_usage_error
from kop_triton import KStackConfig, KStackLM
from kop_triton.checkpoint import load_checkpoint
from kop_triton.convert import main
from kop_triton.modules import ROSA_RHO_INIT

REF_CKPT = SHARED / "reference" / "k-language-model-v2" / "char_shakespeare_v2_rosa_off.pt"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


def reference_layout(model: KStackLM) -> dict:
    """Our state dict renamed to the reference repository's v2 key names (written out by hand)."""
    c = model.config
    out = {}
    for k, t in model.state_dict().items():
        parts = k.split(".")
        if k == "emb.weight":
            out[k] = t
        elif k == "emb_proj.weight":
            out["emb_to_model.weight"] = t
        elif k == "stack.shared_kernel":
            out["k_stack.shared_k_base_kernel"] = t
        elif parts[:2] == ["stack", "blocks"]:
            i, rest = parts[2], ".".join(parts[3:])
            rest = {"mix.weight": "feature_mix.weight", "mix.bias": "feature_mix.bias",
                    "mixer.gate_logit": "k_base_gate_logit", "mixer.kernel": "k_base_kernel"}.get(rest, rest)
            rest = rest.replace("mixer.", "")
            out[f"k_stack.layers.{i}.{rest}"] = t
        elif k == "norm.scale" or k.startswith("rosa_emb."):
            out[k] = t
        elif k == "rosa_proj.weight":
            out["rosa_to_model.weight"] = t
        elif c.head == "linear":
            out["head.output_projection.weight"] = t
        elif c.head == "gelu":
            out[k] = t   # head.norm.scale, head.up.*, head.down.weight: same names
        else:
            out["head.head." + k[len("head."):]] = t
    if c.head == "linear":
        out["head.head.weight"] = out["emb.weight"]
    for i in range(1, c.n_k2 + 1):   # the reference has one in every K2 layer, at its init when unused
        out.setdefault(f"k_stack.layers.{i}.rho_logit", torch.tensor(ROSA_RHO_INIT))
    out.setdefault("rosa_emb.weight", torch.randn(c.vocab_size + 1, c.E) * 0.02)
    if c.E != c.d_model:
        out.setdefault("rosa_to_model.weight", torch.randn(c.d_model, c.E) * 0.02)
    return {"_orig_mod." + k: v.clone() for k, v in out.items()}


def save_reference(path, model, extra=None):
    blob = {"step": 12, "best_ppl": 3.5, "model": reference_layout(model), "optimizer": {"state": {}},
            "rng_state": {"numpy": ("MT19937", np.arange(624, dtype=np.uint32), 0, 0, 0.0),
                          "torch_cpu": torch.get_rng_state()}}
    blob.update(extra or {})
    torch.save(blob, path)


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(set(TEXT)), d_model=8, n_k2=2, rank=3, kernel_size=4, gamma_min=0.1,
               alpha_cap=2.0, backend="chunked")
    cfg.update(kw)
    m = KStackLM(KStackConfig(**cfg))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _args(src, out, text, *more):
    return [str(src), str(out), "--tokenizer", "char", "--text", str(text), "--gamma-min", "0.1",
            "--alpha-cap", "2.0", *more]


@pytest.mark.parametrize("kw", [{}, dict(head="gelu", head_mult=3, emb_dim=5, shared_kernel=False),
                                dict(emb_dim=6), dict(vocab_size=len(set(TEXT)), head="adaptive",
                                                      adaptive_cutoffs=[5, 15], adaptive_div_value=2.0)],
                         ids=["linear-shared", "gelu-embproj-per-layer", "linear-embproj", "adaptive"])
def test_synthetic_reference_checkpoint_round_trip(tmp_path, kw):
    m = _model(**kw)
    save_reference(tmp_path / "src.pt", m)
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(_args(tmp_path / "src.pt", tmp_path / "out", tmp_path / "text.txt")) == 0
    m2, tok = load_checkpoint(tmp_path / "out")
    assert m2.config.to_dict() == {**m.config.to_dict(), "backend": "auto"}
    ids = torch.tensor([tok.encode(TEXT[:40])])
    m2.set_backend("chunked")
    assert torch.equal(m2(ids), m(ids))
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["meta"]
    assert meta == {"converted_from": "src.pt", "source_step": 12, "source_best_ppl": 3.5}


def test_byte_tokenizer_checkpoint(tmp_path):
    m = _model(vocab_size=256, n_k2=1)
    save_reference(tmp_path / "src.pt", m)
    assert main([str(tmp_path / "src.pt"), str(tmp_path / "out"), "--tokenizer", "byte", "--gamma-min", "0.1",
                 "--alpha-cap", "2.0", "--gamma-max", "1.0"]) == 0
    m2, tok = load_checkpoint(tmp_path / "out")
    ids = torch.tensor([tok.encode("naïve café")])
    m2.set_backend("chunked")
    assert tok.vocab_size == 256 and torch.equal(m2(ids), m(ids))


def test_gamma_min_and_alpha_cap_are_required(tmp_path, capsys):
    m = _model()
    save_reference(tmp_path / "src.pt", m)
    (tmp_path / "text.txt").write_text(TEXT)
    for drop in ("--gamma-min", "--alpha-cap"):
        args = _args(tmp_path / "src.pt", tmp_path / "out", tmp_path / "text.txt")
        i = args.index(drop)
        del args[i:i + 2]
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == f"kop-convert: error: the following arguments are required: {drop} (see --help)\n", err
    assert not (tmp_path / "out").exists()


def _expect_error(capsys, args, match):
    assert_cli_usage_error(capsys, main, "kop-convert", args, match)


def test_cli_errors_are_one_line(tmp_path, capsys):
    m = _model()
    src, text, out = tmp_path / "src.pt", tmp_path / "text.txt", tmp_path / "out"
    save_reference(src, m)
    text.write_text(TEXT)
    _expect_error(capsys, _args(tmp_path / "nope.pt", out, text), "does not exist")
    _expect_error(capsys, _args(src, out, tmp_path / "missing.txt"), "--text file not found")
    (tmp_path / "other.txt").write_text("abc")
    _expect_error(capsys, _args(src, out, tmp_path / "other.txt"), "has 3 tokens but the checkpoint's embedding has")
    _expect_error(capsys, [src, out, "--tokenizer", "char", "--gamma-min", "0.1", "--alpha-cap", "1"],
                  "needs --text")
    _expect_error(capsys, [src, out, "--tokenizer", "byte", "--gamma-min", "0.1", "--alpha-cap", "1"],
                  "has 256 tokens")
    _expect_error(capsys, _args(src, out, text)[:-4] + ["--gamma-min", "1.5", "--alpha-cap", "1"], "gamma_min")
    (tmp_path / "trunc.pt").write_bytes(src.read_bytes()[:1000])
    _expect_error(capsys, _args(tmp_path / "trunc.pt", out, text), "not a complete torch zip archive")
    assert not out.exists()
    assert main(_args(src, out, text)) == 0
    capsys.readouterr()
    before = (out / "model.safetensors").read_bytes()
    _expect_error(capsys, _args(src, out, text), "already holds a kop-triton checkpoint")
    assert (out / "model.safetensors").read_bytes() == before
    assert main(_args(src, out, text, "--overwrite")) == 0


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    """Only the allow-listed numpy globals may be unpickled; anything else is refused."""
    m = _model()
    save_reference(tmp_path / "src.pt", m, extra={"when": datetime.datetime(2020, 1, 1)})
    (tmp_path / "text.txt").write_text(TEXT)
    _expect_error(capsys, _args(tmp_path / "src.pt", tmp_path / "out", tmp_path / "text.txt"),
                  "refused by the weights-only unpickler: Unsupported global: GLOBAL datetime.datetime")


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("_orig_mod.k_stack.layers.4.gain"), "unexpected layer sequence"),
    (lambda sd: sd.__setitem__("_orig_mod.head.head.weight", torch.zeros(len(set(TEXT)), 8)), "not tied"),
    (lambda sd: sd.__setitem__("_orig_mod.k_stack.layers.2.u", torch.zeros(8, 5)), "expected shape (8, 3)"),
    (lambda sd: sd.pop("_orig_mod.k_stack.layers.1.proj.bias"), "missing tensors"),
    (lambda sd: sd.__setitem__("_orig_mod.k_stack.layers.1.k_base", torch.zeros(4, 4)), "v1 checkpoint"),
], ids=["layers", "untied", "shape", "missing", "v1"])
def test_bad_source_state_dicts(tmp_path, capsys, edit, match):
    m = _model()
    blob = {"model": reference_layout(m)}
    if match == "unexpected layer sequence":
        for k in [k for k in blob["model"] if ".layers.4." in k]:
            blob["model"].pop(k)
    else:
        edit(blob["model"])
    torch.save(blob, tmp_path / "src.pt")
    (tmp_path / "text.txt").write_text(TEXT)
    _expect_error(capsys, _args(tmp_path / "src.pt", tmp_path / "out", tmp_path / "text.txt"), match)
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kop_triton.convert", str(tmp_path / "x.pt"), str(tmp_path / "o"),
                        "--tokenizer", "byte", "--gamma-min", "0.05", "--alpha-cap", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not (REF_CKPT.is_file() and SHAKESPEARE.is_file()),
                    reason=f"reference checkpoint or Tiny Shakespeare not found under {SHARED}")
def test_released_checkpoint_converts(tmp_path):
    rc = main([str(REF_CKPT), str(tmp_path / "ck"), "--tokenizer", "char", "--text", str(SHAKESPEARE),
               "--gamma-min", "0.05", "--alpha-cap", "1.0"])
    assert rc == 0
    m, tok = load_checkpoint(tmp_path / "ck")
    c = m.config
    assert (c.vocab_size, c.d_model, c.emb_dim, c.n_k2, c.rank, c.kernel_size, c.shared_kernel, c.head) == \
        (65, 64, None, 6, 4, 8, True, "linear")
    assert (c.gamma_min, c.gamma_max, c.alpha_cap) == (0.05, 1.0, 1.0)
    assert m.num_parameters() == 174462 and tok.vocab_size == 65
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())["meta"]
    assert meta["source_step"] == 4750
