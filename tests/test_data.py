"""Data: locations and downloads, splits, tokenizers (SentencePiece on the train split), the sampler."""
from __future__ import annotations

import io
import urllib.error

import pytest
import torch

from kop_triton import data as kdata
from kop_triton.data import BatchSampler, DataError, build_tokenizer, load_text_splits, split_text


def words_text(n_words: int, seed: int = 0, vocab=("alpha", "beta", "gamma", "delta", "omega", "sigma")) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(vocab), (n_words,), generator=g).tolist()
    return " ".join(vocab[i] + ("\n" if j % 11 == 10 else "") for j, i in enumerate(idx))


# ------------------------------------------------------------------------------- splits and locations

@pytest.mark.parametrize("n, frac, cut", [(1000, 0.1, 900), (1001, 0.1, 900), (10, 0.5, 5), (3, 0.9, 1), (2, 0.01, 1)])
def test_split_text_takes_the_last_fraction(n, frac, cut):
    text = "".join(chr(65 + i % 26) for i in range(n))
    train, valid = split_text(text, frac)
    assert (train, valid) == (text[:cut], text[cut:])


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_split_text_rejects_bad_fraction(frac):
    with pytest.raises(DataError, match="val-frac"):
        split_text("abcdef", frac)


def test_tinyshakespeare_from_data_dir_env_and_path(tmp_path, monkeypatch):
    text = words_text(500)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(text, encoding="utf-8")
    cut = int(len(text) * 0.9)
    s = load_text_splits("tinyshakespeare", data_dir=str(tmp_path), allow_download=False)
    assert (s.train, s.valid, s.test) == (text[:cut], text[cut:], None)
    monkeypatch.setenv("KOP_DATA_DIR", str(tmp_path))
    assert load_text_splits("shakespeare", allow_download=False).valid == text[cut:]   # alias + env
    s = load_text_splits("tinyshakespeare", data_path=str(tmp_path / "tinyshakespeare" / "input.txt"), val_frac=0.2)
    assert s.valid == text[int(len(text) * 0.8):]


def test_wikitext2_uses_its_standard_files(tmp_path):
    root = tmp_path / "wikitext-2"
    root.mkdir()
    for name in ("train", "valid", "test"):
        (root / f"{name}.txt").write_text(f" = {name} = \n" + words_text(50, seed=len(name)), encoding="utf-8")
    s = load_text_splits("wikitext2", data_dir=str(tmp_path), allow_download=False)
    assert s.train.startswith(" = train") and s.valid.startswith(" = valid") and s.test.startswith(" = test")
    assert load_text_splits("wikitext-2", data_path=str(root)).valid == s.valid
    with pytest.raises(DataError, match="must be a directory"):
        load_text_splits("wikitext2", data_path=str(root / "train.txt"))


def test_missing_file_without_network_gives_a_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(kdata.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        load_text_splits("tinyshakespeare", data_dir=str(tmp_path))
    msg = str(err.value)
    assert "raw.githubusercontent.com/karpathy/char-rnn" in msg and "KOP_DATA_DIR" in msg and "\n" not in msg
    assert not (tmp_path / "tinyshakespeare").exists(), "no partial file and no empty cache folder left behind"
    with pytest.raises(DataError):
        load_text_splits("wikitext2", data_dir=str(tmp_path / "new" / "cache"))
    assert list(tmp_path.iterdir()) == [], "none of the folders the download created"


def test_download_writes_the_file_once(tmp_path, monkeypatch):
    payload = words_text(300).encode("utf-8")
    calls = []

    def fake(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(kdata.urllib.request, "urlopen", fake)
    s1 = load_text_splits("tinyshakespeare", data_dir=str(tmp_path))
    s2 = load_text_splits("tinyshakespeare", data_dir=str(tmp_path))
    assert len(calls) == 1 and calls[0].endswith("tinyshakespeare/input.txt")
    assert (tmp_path / "tinyshakespeare" / "input.txt").read_bytes() == payload
    assert s1.train + s1.valid == payload.decode() == s2.train + s2.valid


def test_bad_text_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfedef")
    with pytest.raises(DataError, match="not UTF-8"):
        load_text_splits(text_file=str(bad))
    with pytest.raises(DataError, match="not found"):
        load_text_splits(text_file=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown dataset"):
        load_text_splits("penn-treebank", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------- tokenizers

def test_char_and_byte_tokenizers(tmp_path):
    s = kdata.TextSplits(train="hello world", valid="hold!", test=None, source="t")
    tok = build_tokenizer("char", s)
    assert tok.vocab_size == len(set("hello worldhold!"))
    assert tok.decode(tok.encode("hold world!")) == "hold world!"
    assert build_tokenizer("byte", s).vocab_size == 256
    with pytest.raises(DataError, match="unknown tokenizer"):
        build_tokenizer("bpe42", s)


def test_sentencepiece_is_trained_on_the_train_split_only_and_cached(tmp_path, monkeypatch):
    train = words_text(6000)
    valid = " ".join(["zqxjvk"] * 400)  # a word only the validation text has, very frequent there
    path = tmp_path / "corpus.txt"
    path.write_text(train + valid, encoding="utf-8")
    splits = load_text_splits(text_file=str(path), val_frac=len(valid) / len(train + valid) + 0.01)
    assert "zqxjvk" in splits.valid and "zqxj" not in splits.train
    tok = build_tokenizer("sentencepiece", splits, sp_vocab_size=60)
    pieces = [tok.sp.IdToPiece(i) for i in range(tok.vocab_size)]
    assert 10 <= tok.vocab_size <= 60      # a 6-word language has few pieces to find
    assert any("alpha" in p for p in pieces)               # frequent train words became pieces
    assert not any("zq" in p or "xj" in p for p in pieces)  # the validation-only word did not
    assert tok.decode(tok.encode("alpha beta omega")) == "alpha beta omega"
    cached = list((tmp_path / "tokenizers").glob("*.model"))
    assert len(cached) == 1

    def no_retrain(*a, **k):
        raise AssertionError("retrained although the model is cached")

    monkeypatch.setattr(kdata, "train_sentencepiece", no_retrain)
    tok2 = build_tokenizer("sentencepiece", splits, sp_vocab_size=60)
    assert tok2.encode(train[:500]) == tok.encode(train[:500])
    tok3 = build_tokenizer("sentencepiece", splits, sp_model=str(cached[0]))
    assert tok3.encode(valid[:100]) == tok.encode(valid[:100])
    with pytest.raises(DataError, match="not found"):
        build_tokenizer("sentencepiece", splits, sp_model=str(tmp_path / "none.model"))


# ------------------------------------------------------------------------------- sampler

def test_sampler_windows_are_slices_of_the_stream():
    ids = torch.arange(1000) * 3 % 997
    s = BatchSampler(ids, window=16, batch_size=6, seed=1)
    x, y = s.batch(5)
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.long
    offs = s.offsets(5)
    for i, o in enumerate(offs.tolist()):
        assert torch.equal(x[i], ids[o:o + 16]) and torch.equal(y[i], ids[o + 1:o + 17])


def test_sampler_is_a_function_of_seed_and_step():
    ids = torch.arange(5000)
    a, b = BatchSampler(ids, 8, 4, seed=3), BatchSampler(ids, 8, 4, seed=3)
    later = a.batch(17)[0]
    for step in range(17):  # drawing other steps in between changes nothing
        b.batch(step)
    assert torch.equal(b.batch(17)[0], later) and torch.equal(a.batch(17)[0], later)
    assert not torch.equal(a.batch(18)[0], later)
    assert not torch.equal(BatchSampler(ids, 8, 4, seed=4).batch(17)[0], later)


def test_sampler_ranks_partition_the_global_batch():
    ids = torch.arange(3000)
    s = BatchSampler(ids, 10, 8, seed=0)
    full = s.batch(3)[0]
    for world in (2, 4, 8):
        parts = torch.cat([s.batch(3, rank=r, world=world)[0] for r in range(world)])
        assert torch.equal(parts, full)
    with pytest.raises(ValueError, match="divisible"):
        s.batch(0, rank=0, world=3)


def test_sampler_reaches_both_ends_and_rejects_short_data():
    ids = torch.arange(20)
    s = BatchSampler(ids, window=15, batch_size=8, seed=0)
    seen = torch.cat([s.offsets(k) for k in range(40)])
    assert set(seen.tolist()) == set(range(0, 20 - 15))  # last valid offset: 20 - 15 - 1 = 4
    with pytest.raises(DataError, match="window"):
        BatchSampler(torch.arange(10), window=9, batch_size=2, seed=0)
