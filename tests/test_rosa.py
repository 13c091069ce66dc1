"""ROSA next-token ids (kop_triton.rosa): "exact" against the definition evaluated directly
(brute force), "reference" against an independent dict-based automaton with the reference
implementation's clone rule, the streaming state against the batch, and argument checks.
The scores of the released checkpoints are in test_rosa_model.py."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import SHARED
from kop_triton.rosa import RosaStream, naive_rosa_next_ids, rosa_next_ids

SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"


def dict_automaton(xs, clone_len_from_split_state):
    """A suffix automaton with dict transitions, written from the textbook construction; with
    ``clone_len_from_split_state`` a clone's length is len(q) + 1 (the state it is split from),
    as the reference implementation's rosa.py / rosa_ext.cpp compute it, instead of len(p) + 1.
    Output per position: x[e + 1] for the most recent recorded end e of the first state with a
    recorded end on the suffix-link chain of the new state, else -1."""
    nxt, link, length, last_end = [{}], [-1], [0], [-1]
    last, out = 0, []
    for i, c in enumerate(xs):
        cur = len(nxt)
        nxt.append({}); link.append(-1); length.append(length[last] + 1); last_end.append(-1)
        p = last
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            p = link[p]
        if p == -1:
            link[cur] = 0
        else:
            q = nxt[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                cl = len(nxt)
                nxt.append(dict(nxt[q])); link.append(link[q]); last_end.append(last_end[q])
                length.append(length[q] + 1 if clone_len_from_split_state else length[p] + 1)
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = cl
                    p = link[p]
                link[q] = link[cur] = cl
        last = cur
        s, ans = cur, -1
        while s != -1:
            if length[s] > 0 and last_end[s] >= 0:
                ans = xs[last_end[s] + 1]
                break
            s = link[s]
        out.append(ans)
        s = cur
        while s != -1 and last_end[s] < i:
            last_end[s] = i
            s = link[s]
    return out


def periodic(rng, n, vocab):
    period = [rng.randrange(vocab) for _ in range(rng.randint(1, 7))]
    seq = (period * (n // len(period) + 1))[:n]
    for _ in range(rng.randint(0, 3)):          # a few mutations break the period
        if seq:
            seq[rng.randrange(len(seq))] = rng.randrange(vocab)
    return seq


def sequences(seed, count=60):
    rng = random.Random(seed)
    out = [[], [0], [3, 3], [0] * 50, [0, 1] * 30, [1, 0, 0] * 20]
    for k in range(count):
        n, vocab = rng.randint(1, 150), rng.choice([1, 2, 3, 4, 26, 300])
        out.append(periodic(rng, n, vocab) if k % 2 else [rng.randrange(vocab) for _ in range(n)])
    return out


def test_exact_matches_the_definition():
    for seq in sequences(0):
        got = rosa_next_ids(torch.tensor(seq, dtype=torch.long), "exact").tolist()
        assert got == naive_rosa_next_ids(seq), seq


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=120))
def test_exact_matches_the_definition_property(seq):
    assert rosa_next_ids(torch.tensor(seq, dtype=torch.long), "exact").tolist() == naive_rosa_next_ids(seq)


def test_naive_definition_on_a_hand_case():
    # a b a b c a b: i=2 'a' recurs (j=0) -> x1 = b; i=3 "ab" (j=1) -> x2 = a; i=4 'c' new -> -1;
    # i=5 'a' most recent j=2 -> x3 = b; i=6 "ab" most recent j=3 -> x4 = c
    assert naive_rosa_next_ids([0, 1, 0, 1, 2, 0, 1]) == [-1, -1, 1, 0, -1, 1, 2]


def test_exact_matches_the_textbook_dict_automaton():
    for seq in sequences(1):
        assert rosa_next_ids(torch.tensor(seq, dtype=torch.long), "exact").tolist() == dict_automaton(seq, False)


def test_reference_matches_the_reference_clone_rule():
    for seq in sequences(2):
        got = rosa_next_ids(torch.tensor(seq, dtype=torch.long), "reference").tolist()
        assert got == dict_automaton(seq, True), seq


def test_reference_differs_from_the_definition():
    # the reference's clone lengths change answers on some inputs (and never on trivial ones)
    rng = random.Random(3)
    diffs = 0
    for _ in range(200):
        seq = [rng.randrange(3) for _ in range(60)]
        x = torch.tensor(seq)
        diffs += int((rosa_next_ids(x, "reference") != rosa_next_ids(x, "exact")).sum())
    assert diffs > 0
    x = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    assert torch.equal(rosa_next_ids(x, "reference"), rosa_next_ids(x, "exact"))


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data/tinyshakespeare/input.txt is absent")
def test_on_text_both_modes_match_their_references():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    chars = sorted(set(text))
    seq = [chars.index(c) for c in text[-600:]]
    x = torch.tensor(seq)
    assert rosa_next_ids(x, "exact").tolist() == naive_rosa_next_ids(seq)
    assert rosa_next_ids(x, "reference").tolist() == dict_automaton(seq, True)


@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_batch_rows_are_independent_and_threads_agree(mode):
    rng = random.Random(4)
    rows = [periodic(rng, 97, 5) if r % 2 else [rng.randrange(5) for _ in range(97)] for r in range(7)]
    x = torch.tensor(rows, dtype=torch.int32)
    one = rosa_next_ids(x, mode, num_threads=1)
    assert one.dtype == torch.int64 and one.shape == (7, 97)
    for r in range(7):
        assert torch.equal(one[r], rosa_next_ids(x[r], mode))
    assert torch.equal(rosa_next_ids(x, mode, num_threads=3), one)
    assert torch.equal(rosa_next_ids(x[:, ::2], mode), torch.stack([rosa_next_ids(x[r, ::2], mode) for r in range(7)]))


@pytest.mark.parametrize("vocab", [7, 5000])      # dense transition table / edge lists
@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_stream_matches_batch_unbounded_and_per_window(mode, vocab):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 4, (3, 130), generator=g) * (vocab // 4)
    s = RosaStream(3, vocab, mode)
    got = torch.cat([s.extend(x[:, :50]), torch.stack([s.push(x[:, t]) for t in range(50, 130)], 1)], 1)
    assert torch.equal(got, rosa_next_ids(x, mode, vocab_size=vocab))
    w = RosaStream(3, vocab, mode, window=40)                 # restarted every 40 tokens
    per_window = torch.cat([rosa_next_ids(x[:, i:i + 40], mode, vocab_size=vocab) for i in range(0, 130, 40)], 1)
    assert torch.equal(w.extend(x), per_window)


def test_stream_clone_is_independent():
    x = torch.tensor([[0, 1, 0, 1, 2, 0]])
    s = RosaStream(1, 3, "exact")
    s.extend(x[:, :4])
    c = s.clone()
    a = s.extend(x[:, 4:])
    assert c.position == 4 and torch.equal(c.extend(x[:, 4:]), a)
    assert torch.equal(torch.cat([rosa_next_ids(x[0, :4]), a[0]]), rosa_next_ids(x[0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="rosa mode"):
        rosa_next_ids(torch.tensor([1, 2]), "approx")
    with pytest.raises(ValueError, match="rosa mode"):
        rosa_next_ids(torch.tensor([1, 2]), "off")
    with pytest.raises(ValueError, match="integer tensor"):
        rosa_next_ids(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="integer tensor"):
        rosa_next_ids(torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        rosa_next_ids(torch.tensor([1, -1, 2]))
    with pytest.raises(ValueError, match="vocab_size=4|\\[0, 4\\)"):
        rosa_next_ids(torch.tensor([1, 4]), vocab_size=4)
    with pytest.raises(ValueError, match="num_threads"):
        rosa_next_ids(torch.tensor([1, 2]), num_threads=0)
    s = RosaStream(2, 5)
    with pytest.raises(ValueError, match=r"ids_t must be an integer tensor of shape \(2,\)"):
        s.push(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        s.push(torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="window"):
        RosaStream(2, 5, window=0)
    assert rosa_next_ids(torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert rosa_next_ids(torch.zeros(3, 0, dtype=torch.long)).shape == (3, 0)
