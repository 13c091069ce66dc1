"""Checkpoint directories: round trips (every head, every tokenizer), atomic writes, and clear
CheckpointErrors for corrupted / truncated / mismatched files without touching anything."""
import json
import os

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kop_triton import KStackConfig, KStackLM
from kop_triton.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kop_triton.tokenizers import ByteTokenizer, CharTokenizer, SentencePieceTokenizer, tokenizer_from_config

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak!\n"


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(set(TEXT)), d_model=8, n_k2=2, rank=2, kernel_size=3, backend="chunked")
    cfg.update(kw)
    return KStackLM(KStackConfig(**cfg)).eval()


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("kw", [{}, dict(head="gelu", head_mult=2, emb_dim=5, shared_kernel=False),
                                dict(head="adaptive", adaptive_cutoffs=[8, 20], adaptive_div_value=2.0, refine_steps=1)],
                         ids=["linear", "gelu-per-layer-kernel", "adaptive-refine"])
def test_round_trip(tmp_path, kw):
    m = _model(**kw)
    tok = CharTokenizer(TEXT)
    save_checkpoint(tmp_path / "ck", m, tok, extra={"notes.bin": b"\x00\x01"}, meta={"step": 7})
    m2, tok2 = load_checkpoint(tmp_path / "ck")
    assert m2.config == m.config and not m2.training
    ids = torch.randint(0, tok.vocab_size, (2, 9))
    assert torch.equal(m2(ids), m(ids))
    assert tok2.to_config() == tok.to_config() and tok2.decode(tok2.encode(TEXT)) == TEXT
    assert (tmp_path / "ck" / "notes.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors", "notes.bin"]
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["meta"] == {"step": 7} and cfg["model"]["vocab_size"] == m.config.vocab_size
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o044   # not left at mkstemp's 0600


def test_overwrite_replaces_everything(tmp_path):
    save_checkpoint(tmp_path, _model(), CharTokenizer(TEXT))
    save_checkpoint(tmp_path, _model(vocab_size=256, n_k2=1), ByteTokenizer())
    m, tok = load_checkpoint(tmp_path)
    assert m.config.n_k2 == 1 and isinstance(tok, ByteTokenizer)


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT * 3 + "the quick brown fox jumps over the lazy dog\n") * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="unigram", minloglevel=2, hard_vocab_limit=False)
    tok = SentencePieceTokenizer(str(tmp_path / "sp.model"))
    m = _model(vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "ck", m, tok)
    _, tok2 = load_checkpoint(tmp_path / "ck")
    assert tok2.encode(TEXT) == tok.encode(TEXT) and tok2.decode(tok.encode(TEXT)) == tok.decode(tok.encode(TEXT))
    assert not (tmp_path / "ck" / "sp.model").exists()   # the model proto lives inside config.json


def test_tokenizers():
    tok = CharTokenizer(TEXT)
    assert tok.vocab_size == len(set(TEXT)) and tok.chars == "".join(sorted(set(TEXT)))
    assert tok.encode("\n") == [0] and tok.decode(tok.encode(TEXT)) == TEXT
    with pytest.raises(ValueError, match="'Z' is not in this char tokenizer"):
        tok.encode("Zebra")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    b = ByteTokenizer()
    assert b.encode("é") == [0xC3, 0xA9] and b.decode([0xC3, 0xA9]) == "é" and b.decode([0xC3]) == "\ufffd"
    assert tokenizer_from_config(b.to_config()).vocab_size == 256
    for bad in ({"type": "wordpiece"}, {"type": "char", "chars": "ba"}, {"type": "char"}, "char"):
        with pytest.raises(ValueError):
            tokenizer_from_config(bad)


@pytest.fixture
def saved(tmp_path):
    m = _model()
    save_checkpoint(tmp_path, m, CharTokenizer(TEXT))
    return tmp_path, m


def _rewrite_weights(directory, state):
    """Write new weights and a matching checksum, so only the content check can catch them."""
    import hashlib
    data = st_save(state)
    (directory / "model.safetensors").write_bytes(data)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    (directory / "config.json").write_text(json.dumps(cfg))


def test_corrupted_weights_are_refused(saved):
    d, _ = saved
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(d)


def test_truncated_weights_are_refused(saved):
    d, _ = saved
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(d)
    _rewrite_weights(d, {})  # checksum fine, but not a usable file: fails on content
    (d / "model.safetensors").write_bytes(b"\x10\x00")
    cfg = json.loads((d / "config.json").read_text())
    cfg["weights"].pop("sha256")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(d)


def test_missing_and_unexpected_and_misshapen_tensors(saved):
    d, m = saved
    state = st_load((d / "model.safetensors").read_bytes())
    bad = dict(state)
    bad.pop("stack.blocks.1.mixer.u")
    bad["stack.blocks.1.mixer.rho_logit"] = torch.zeros(())
    bad["norm.scale"] = torch.ones(9)
    _rewrite_weights(d, bad)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    msg = str(e.value)
    assert "missing tensors ['stack.blocks.1.mixer.u']" in msg
    assert "unexpected tensors ['stack.blocks.1.mixer.rho_logit']" in msg
    assert "norm.scale: expected shape (8,), got (9,)" in msg


@pytest.mark.parametrize("edit, match", [
    (lambda c: "{not json", "corrupted"),
    (lambda c: json.dumps({**c, "format": "other"}), "not a kop-triton-checkpoint"),
    (lambda c: json.dumps({**c, "version": 99}), "version"),
    (lambda c: json.dumps({**c, "model": {**c["model"], "d_model": 0}}), "bad model config"),
    (lambda c: json.dumps({**c, "model": {**c["model"], "colour": 1}}), "unknown KStackConfig fields"),
    (lambda c: json.dumps({**c, "tokenizer": {"type": "morse"}}), "bad tokenizer config"),
    (lambda c: json.dumps({k: v for k, v in c.items() if k != "weights"}), "lacks the 'weights' section"),
], ids=["json", "format", "version", "model", "unknown-field", "tokenizer", "no-weights"])
def test_bad_config_is_refused(saved, edit, match):
    d, _ = saved
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(edit(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(d)


def test_missing_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")
    d, _ = saved
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(d)


def test_failed_save_leaves_old_checkpoint_untouched(saved, monkeypatch):
    d, m = saved
    before = _snapshot(d)
    import kop_triton.checkpoint as ck
    real = ck._write_temp
    calls = []

    def failing(directory, name, data):
        calls.append(name)
        if name == "config.json":
            raise OSError("disk full")
        return real(directory, name, data)

    monkeypatch.setattr(ck, "_write_temp", failing)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(d, _model(n_k2=1), CharTokenizer(TEXT))
    assert calls == ["model.safetensors", "config.json"]
    assert _snapshot(d) == before          # no new file kept, no temp file left behind
    monkeypatch.undo()
    for bad_extra in ({"config.json": b""}, {"../x": b""}, {".hidden": b""}):
        with pytest.raises(ValueError, match="extra file name"):
            save_checkpoint(d, m, CharTokenizer(TEXT), extra=bad_extra)
    with pytest.raises(ValueError, match="vocab_size"):
        save_checkpoint(d, m, ByteTokenizer())
    assert _snapshot(d) == before
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]
