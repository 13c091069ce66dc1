"""Evaluation protocol, the eval CLI, and the released reference checkpoint's score through our
model (chunked CPU path on the whole validation set; Triton vs chunked logits on one window)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import SHARED, assert_cli_usage_error, assert_close
from kop_triton import KStackConfig, KStackLM
from kop_triton.checkpoint import load_checkpoint, save_checkpoint
from kop_triton.eval import evaluate, main, validation_ids
from kop_triton.tokenizers import CharTokenizer
from test_module_koperator import triton_k2_missing

REF_CKPT = SHARED / "reference" / "k-language-model-v2" / "char_shakespeare_v2_rosa_off.pt"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
needs_reference = pytest.mark.skipif(not (REF_CKPT.is_file() and SHAKESPEARE.is_file()),
                                     reason=f"reference checkpoint or Tiny Shakespeare not found under {SHARED}")


def _tiny(vocab=7):
    torch.manual_seed(0)
    return KStackLM(KStackConfig(vocab_size=vocab, d_model=8, n_k2=1, rank=2, kernel_size=3, backend="chunked"))


def test_evaluate_follows_the_protocol():
    m = _tiny()
    W = 16
    ids = torch.randint(0, 7, (3 * W + 6,))
    res = evaluate(m, ids, window=W, batch_size=2)
    total = 0.0
    with torch.no_grad():
        for i in range(3):   # each window from a zero state, targets shifted by one, tail dropped
            x, y = ids[i * W:(i + 1) * W], ids[i * W + 1:(i + 1) * W + 1]
            total += float(F.cross_entropy(m(x[None])[0], y, reduction="sum"))
    assert res["tokens"] == 3 * W and res["windows"] == 3
    assert math.isclose(res["val_ce"], total / (3 * W), rel_tol=1e-6)
    assert math.isclose(res["val_ppl"], math.exp(res["val_ce"]), rel_tol=1e-12)
    for bs in (1, 3, 8):
        assert math.isclose(evaluate(m, ids, window=W, batch_size=bs)["val_ce"], res["val_ce"], rel_tol=1e-6)
    tail_changed = ids.clone()
    tail_changed[3 * W + 1:] = (tail_changed[3 * W + 1:] + 1) % 7
    assert evaluate(m, tail_changed, window=W)["val_ce"] == evaluate(m, ids, window=W)["val_ce"]


def test_evaluate_errors_and_split():
    m = _tiny()
    with pytest.raises(ValueError, match="need at least window"):
        evaluate(m, torch.zeros(16, dtype=torch.long), window=16)
    with pytest.raises(ValueError, match="window"):
        evaluate(m, torch.zeros(40, dtype=torch.long), window=0)
    with pytest.raises(ValueError, match="1-D int tensor"):
        evaluate(m, torch.zeros(2, 40, dtype=torch.long), window=4)
    tok = CharTokenizer("abcdefghij")
    assert validation_ids(tok, "abcdefghij", 0.1).tolist() == [9]
    assert validation_ids(tok, "abcdefghij" * 3, 0.5).tolist() == tok.encode(("abcdefghij" * 3)[15:])


def _expect_error(capsys, args, match):
    assert_cli_usage_error(capsys, main, "kop-eval", args, match)


def test_cli(tmp_path, capsys):
    text = "the quick brown fox jumps over the lazy dog. " * 30
    tok = CharTokenizer(text)
    m = _tiny(tok.vocab_size)
    save_checkpoint(tmp_path / "ck", m, tok)
    (tmp_path / "t.txt").write_text(text)
    assert main(["--checkpoint", str(tmp_path / "ck"), "--text", str(tmp_path / "t.txt"), "--window", "32",
                 "--val-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    res = json.loads(out)
    expect = evaluate(m, validation_ids(tok, text, 0.5), window=32)
    assert res["tokens"] == expect["tokens"] and math.isclose(res["val_ce"], expect["val_ce"], rel_tol=1e-6)
    ck, t = tmp_path / "ck", tmp_path / "t.txt"
    _expect_error(capsys, ["--checkpoint", tmp_path / "none", "--text", t], "does not exist")
    _expect_error(capsys, ["--checkpoint", ck, "--text", tmp_path / "none.txt"], "--text file not found")
    _expect_error(capsys, ["--checkpoint", ck, "--text", t, "--window", "0"], "must be positive")
    _expect_error(capsys, ["--checkpoint", ck, "--text", t, "--val-fraction", "1.5"], "--val-fraction")
    _expect_error(capsys, ["--checkpoint", ck, "--text", t, "--window", "100000"], "need at least window")
    (tmp_path / "other.txt").write_text("ZZZ" * 50)
    _expect_error(capsys, ["--checkpoint", ck, "--text", tmp_path / "other.txt", "--window", "8"],
                  "'Z' is not in this char tokenizer")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe" * 40)
    _expect_error(capsys, ["--checkpoint", ck, "--text", tmp_path / "bin.txt"], "not UTF-8")
    _expect_error(capsys, ["--checkpoint", ck, "--text", t, "--device", "tpu:x"], "--device")
    if not torch.cuda.is_available():
        _expect_error(capsys, ["--checkpoint", ck, "--text", t, "--device", "cuda"], "no CUDA device is available")
    for argv, needle in ((["--text", str(t)], "required: --checkpoint"),
                         (["--checkpoint", str(ck), "--text", str(t), "--window", "lots"], "invalid int value")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("kop-eval: error: ") and needle in err, err


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    from kop_triton.convert import convert
    out = tmp_path_factory.mktemp("ref") / "ck"
    convert(REF_CKPT, out, tokenizer="char", text=SHAKESPEARE, gamma_min=0.05, alpha_cap=1.0)
    return out


@needs_reference
def test_reference_checkpoint_score_chunked_cpu(reference_checkpoint):
    """README of the release: val CE 1.4671 (PPL 4.3368) with 2048-token windows."""
    m, tok = load_checkpoint(reference_checkpoint)
    m.set_backend("chunked")
    ids = validation_ids(tok, SHAKESPEARE.read_text(encoding="utf-8"), 0.1)
    res = evaluate(m, ids, window=2048, batch_size=8)
    assert res["tokens"] == 54 * 2048
    assert abs(res["val_ce"] - 1.4671) <= 5e-4, res
    assert round(res["val_ppl"], 2) == 4.34, res


@needs_reference
@pytest.mark.skipif(triton_k2_missing() is not None, reason=str(triton_k2_missing()))
def test_reference_checkpoint_triton_matches_chunked(reference_checkpoint):
    """One short window through the fused Triton mixer (interpreter on CPU) vs the chunked path."""
    from helpers import assert_triton_matches_chunked
    assert_triton_matches_chunked(reference_checkpoint, SHAKESPEARE.read_text(encoding="utf-8"), 96)
