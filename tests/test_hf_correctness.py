"""transformers integration, the results that used to be silently wrong (issue 21, B1-B4) and the live-model
fast step: cache continuation and chunked prefill, the prepared step under LoRA / hooks / in-place weight
changes, Trainer's gradient accumulation (num_items_in_batch), packed sequences (position_ids /
cu_seq_lens_q).  Each is checked against an independent computation: generate(use_cache=False) re-runs
the parallel form on the whole sequence, packed losses against each document scored alone, accumulated
updates against one large batch."""
import pytest
import torch

from helpers import assert_close
from kop_triton import KStackConfig, KStackLM

import kop_triton.hf as hf

CFG = dict(vocab_size=29, d_model=16, n_k2=2, rank=3, kernel_size=4)


def _lm(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = KStackLM(KStackConfig(**{**CFG, **kw})).to(dtype).eval()
    with torch.no_grad():   # non-trivial decays, gates, alphas and weights
        for mixer in m.mixers():
            mixer.decay_logit.normal_(0, 2)
            mixer.alpha_logit.normal_(0, 1)
            mixer.gate_logit.normal_(0, 1)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def _hf(dtype=torch.float64, **kw):
    return hf.KStackForCausalLM.from_kstack(_lm(dtype, **kw)).eval()


def _ids(B, T, seed=1, V=29):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _gen(m, ids, **kw):
    kw.setdefault("do_sample", False)
    return m.generate(ids, pad_token_id=0, attention_mask=kw.pop("attention_mask", torch.ones_like(ids)), **kw)


# ---- B1: cache continuation and chunked prefill ----------------------------------------------


def test_b1_generate_continues_from_a_returned_cache():
    m = _hf()
    P = _ids(2, 9)
    o = _gen(m, P, max_new_tokens=7, return_dict_in_generate=True)
    assert o.past_key_values.get_seq_length() == 9 + 6          # the last sampled token is not fed yet
    x = torch.cat([o.sequences, _ids(2, 4, seed=5)], 1)          # a few tokens appended by the caller
    cont = _gen(m, x, past_key_values=o.past_key_values, max_new_tokens=6, output_scores=True,
                return_dict_in_generate=True)
    fresh = _gen(m, x, max_new_tokens=6, output_scores=True, return_dict_in_generate=True, use_cache=False)
    assert torch.equal(cont.sequences, fresh.sequences)
    for a, b in zip(cont.scores, fresh.scores):
        assert_close("continued scores", a, b, 1e-10)


def test_b1_chunked_prefill_equals_one_prefill():
    m = _hf()
    P = _ids(2, 21)
    ref = _gen(m, P, max_new_tokens=5, use_cache=False, output_scores=True, return_dict_in_generate=True)
    out = _gen(m, P, max_new_tokens=5, prefill_chunk_size=8, past_key_values=hf.KStackCache(), output_scores=True,
               return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert_close("chunked-prefill scores", torch.stack(out.scores), torch.stack(ref.scores), 1e-10)


def test_b1_chunked_prefill_with_left_padding_longer_than_a_chunk():
    m = _hf()
    P = _ids(2, 21)
    mask = torch.ones_like(P)
    mask[1, :11] = 0                                              # row 1: 11 pads, more than a chunk of 8
    out = _gen(m, P, attention_mask=mask, max_new_tokens=4, prefill_chunk_size=8, past_key_values=hf.KStackCache())
    alone = _gen(m, P[1:, 11:], max_new_tokens=4, use_cache=False)
    assert torch.equal(out[1, 21:], alone[0, 10:])
    assert torch.equal(out[0], _gen(m, P[:1], max_new_tokens=4, use_cache=False)[0])


def test_b1_a_cache_longer_than_the_ids_is_refused():
    m = _hf()
    o = _gen(m, _ids(1, 9), max_new_tokens=3, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="past_key_values"):
        _gen(m, _ids(1, 5), past_key_values=o.past_key_values, max_new_tokens=2)


# ---- the sequence grows in place inside transformers' loop -----------------------------------


class _Keep:
    """A logits processor that keeps every input_ids it is handed (not copied) and a copy of it."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append((input_ids, input_ids.clone()))
        return scores


@pytest.mark.parametrize("kw", [dict(do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2),
                                dict(do_sample=True, top_k=5, num_return_sequences=2),
                                dict(do_sample=False, max_length=30, return_dict_in_generate=True)])
def test_growing_sequence_equals_transformers_own_append(kw, monkeypatch):
    """generate's loop appends each token into spare columns (hf._GrowingIds) instead of copying the
    sequence: the result, and what history-reading logits processors see, equal transformers' own
    torch.cat loop; every input_ids a processor kept keeps its values; the result is an ordinary
    contiguous tensor that does not hold the buffer."""
    from transformers import GenerationMixin, LogitsProcessorList
    monkeypatch.setattr(hf, "GROW_IN_PLACE_FROM", 0)              # in place from any length (32k ids by default)
    m = _hf()
    P = _ids(2, 11)
    runs = []
    for own in (False, True):
        if own:
            monkeypatch.setattr(hf.KStackForCausalLM, "_sample", GenerationMixin._sample)
        keep = _Keep()
        torch.manual_seed(3)
        out = _gen(m, P, max_new_tokens=None if "max_length" in kw else 12, logits_processor=LogitsProcessorList([keep]),
                   **kw)
        runs.append((out, keep))
    (ours, keep), (ref, keep_ref) = runs
    seq, seq_ref = (ours.sequences, ref.sequences) if "return_dict_in_generate" in kw else (ours, ref)
    assert type(seq) is torch.Tensor and seq.is_contiguous()
    assert seq.untyped_storage().nbytes() == seq.numel() * seq.element_size()     # no spare columns held
    assert torch.equal(seq, seq_ref) and seq.shape[1] == (30 if "max_length" in kw else 11 + 12)
    assert len(keep.seen) == len(keep_ref.seen)
    assert all(type(a) is hf._GrowingIds for a, _ in keep.seen)                 # the in-place path ran
    for (a, a_copy), (_b, b_copy) in zip(keep.seen, keep_ref.seen):
        assert torch.equal(a, a_copy) and torch.equal(a_copy, b_copy)          # never overwritten
    assert torch.equal(P, _ids(2, 11))                                          # the prompt untouched


def test_growing_sequence_only_from_its_threshold(monkeypatch):
    """Sequences shorter than hf.GROW_IN_PLACE_FROM ids keep transformers' own append (there the
    copy costs less than the subclass's per-op dispatch); from it on, the in-place one."""
    from transformers import LogitsProcessorList
    m = _hf()
    seen = {}
    for limit in (11, 12):
        monkeypatch.setattr(hf, "GROW_IN_PLACE_FROM", limit)
        keep = _Keep()
        seen[limit] = _gen(m, _ids(1, 11), max_new_tokens=3, logits_processor=LogitsProcessorList([keep]))
        assert {type(a) for a, _ in keep.seen} == {hf._GrowingIds if limit == 11 else torch.Tensor}
    assert torch.equal(seen[11], seen[12])


def test_growing_sequence_leaves_other_cats_alone():
    """Only the loop's append of the newest sequence is done in place; a second append to an older
    sequence, or a cat along another dim, is an ordinary copy and leaves the first appends intact."""
    g = hf._GrowingIds.wrap(torch.arange(6).reshape(2, 3), spare=4)
    a = torch.cat([g, torch.tensor([[7], [8]])], dim=-1)
    b = torch.cat([g, torch.tensor([[5], [6]])], dim=-1)                   # g is no longer the newest
    assert type(b) is torch.Tensor and b.tolist() == [[0, 1, 2, 5], [3, 4, 5, 6]]
    assert a.tolist() == [[0, 1, 2, 7], [3, 4, 5, 8]]
    c = torch.cat([a, torch.zeros(2, 30, dtype=torch.long)], -1)          # beyond the spare columns: a new buffer
    assert c.shape == (2, 34) and c[:, :4].tolist() == a.tolist() and a.tolist() == [[0, 1, 2, 7], [3, 4, 5, 8]]
    assert torch.cat([g, g], 0).shape == (4, 3) and type(g[:, -1:]) is torch.Tensor
    with pytest.raises((RuntimeError, TypeError)):
        torch.cat([c, torch.zeros(3, 1, dtype=torch.long)], -1)           # a wrong shape: torch's own error


def test_growing_sequence_shape_and_device_answer_as_the_plain_tensor():
    """shape and device (Python properties, no per-op dispatch) agree with the plain values after
    every append, including one that moves to a new buffer."""
    g = hf._GrowingIds.wrap(torch.arange(6).reshape(2, 3), spare=1)
    for k in (1, 1, 5):                                                    # the third outgrows the buffer
        plain = g.plain()
        assert g.shape == plain.shape == g.size() and g.device == plain.device and g.shape[-1] == g.size(-1)
        g = torch.cat([g, torch.full((2, k), 9)], dim=-1)
        assert type(g) is hf._GrowingIds
    assert g.shape == (2, 10) and g.plain().shape == (2, 10) and g.plain()[:, 3:].eq(9).all()


# ---- B2: the prepared step sees the live model ----------------------------------------------


class _Scale(torch.nn.Module):
    """A wrapper as PEFT makes one: the wrapped Linear plus a low-rank update."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.a = torch.nn.Linear(base.in_features, 2, bias=False).to(base.weight.dtype)
        self.b = torch.nn.Linear(2, base.out_features, bias=False).to(base.weight.dtype)
        torch.nn.init.normal_(self.b.weight, std=0.5)

    def forward(self, x):
        return self.base_layer(x) + self.b(self.a(x))


def _agree_with_rerun(m, P, n=8):
    """greedy and seeded-sampled, cached == uncached; returns the cached greedy tokens."""
    g_c = _gen(m, P, max_new_tokens=n)
    assert torch.equal(g_c, _gen(m, P, max_new_tokens=n, use_cache=False))
    torch.manual_seed(3)
    s_c = _gen(m, P, max_new_tokens=n, do_sample=True, top_k=0)
    torch.manual_seed(3)
    assert torch.equal(s_c, _gen(m, P, max_new_tokens=n, do_sample=True, top_k=0, use_cache=False))
    b_c = _gen(m, P, max_new_tokens=n, num_beams=3)
    assert torch.equal(b_c, _gen(m, P, max_new_tokens=n, num_beams=3, use_cache=False))
    return g_c


def test_b2_wrapped_module_is_seen_by_the_token_steps():
    m = _hf()
    P = _ids(2, 9)
    base = _gen(m, P, max_new_tokens=8)
    blk = m.model.stack.blocks[1]
    blk.mlp.up = _Scale(blk.mlp.up)
    m.model.stack.blocks[0].mix = _Scale(m.model.stack.blocks[0].mix)
    wrapped = _agree_with_rerun(m, P)
    assert not torch.equal(wrapped, base)


def test_b2_peft_lora_generate_equals_rerun():
    peft = pytest.importorskip("peft")
    m = _hf(torch.float32)
    P = _ids(2, 9)
    base = _gen(m, P, max_new_tokens=8)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["mix", "up", "down"], lora_alpha=8))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.eval()
    g = _agree_with_rerun(pm, P)                                  # greedy, sampled, beam: cached == re-run
    assert not torch.equal(g, base)


def test_b2_forward_hook_and_in_place_data_change_are_seen():
    m = _hf()
    P = _ids(2, 9)
    base = _gen(m, P, max_new_tokens=8)
    h = m.model.stack.blocks[2].mlp.up.register_forward_hook(lambda mod, inp, out: out * 3.0)
    hooked = _agree_with_rerun(m, P)
    assert not torch.equal(hooked, base)
    h.remove()
    assert torch.equal(_gen(m, P, max_new_tokens=8), base)      # hook removed: the prepared step again
    with torch.no_grad():
        for p in m.model.stack.blocks[2].parameters():
            p.data.mul_(3.0)                                     # .data: no version counter change
    changed = _gen(m, P, max_new_tokens=8)
    assert torch.equal(changed, _gen(m, P, max_new_tokens=8, use_cache=False))
    assert not torch.equal(changed, base)


def test_b2_kstacklm_step_follows_wrapping_and_hooks():
    lm = _lm()
    ids = _ids(2, 6)
    ref_logits = lm(ids)[:, -1]
    with torch.no_grad():
        lm.stack.blocks[1].mlp.down = _Scale(lm.stack.blocks[1].mlp.down)
        full = lm(ids)[:, -1]
        _, st = lm.prefill(ids[:, :-1])
        step, _ = lm.step(ids[:, -1], st)
    assert_close("step with a wrapped module", step, full, 1e-10)
    assert (full - ref_logits).abs().max() > 1e-3


# ---- B3: gradient accumulation through Trainer ---------------------------------------------


def _train(tmp_path, batch, accum):
    from transformers import Trainer, TrainingArguments
    m = _hf(torch.float64).train()
    data = []
    for i in range(4):
        ids = _ids(1, 12, seed=10 + i)[0]
        labels = ids.clone()
        labels[: 2 + 3 * i] = -100                                # unequal numbers of scored tokens per example
        data.append({"input_ids": ids, "labels": labels})
    args = TrainingArguments(output_dir=str(tmp_path / f"b{batch}a{accum}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, max_steps=1, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
                             seed=0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    Trainer(model=m, args=args, train_dataset=data).train()
    return {k: v - before[k] for k, v in m.state_dict().items()}


def test_b3_trainer_accumulation_gives_the_update_of_one_batch(tmp_path):
    one = _train(tmp_path, 4, 1)
    two = _train(tmp_path, 2, 2)
    assert max(v.abs().max().item() for v in one.values()) > 1e-4
    for k in one:
        assert_close(f"update of {k}", two[k], one[k], 1e-9)


def test_b3_num_items_in_batch_normalises_the_summed_loss():
    m = _hf()
    ids = _ids(2, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    mean = m(ids, labels=labels).loss
    n = int((labels[:, 1:] != -100).sum())
    summed = m(ids, labels=labels, num_items_in_batch=torch.tensor(2 * n)).loss
    assert_close("sum / num_items_in_batch", summed, mean / 2, 1e-12)
    assert hf.KStackForCausalLM.accepts_loss_kwargs


# ---- B4: packed sequences ---------------------------------------------------------------


def _docs():
    return [_ids(1, n, seed=20 + n)[0] for n in (7, 11, 5)]


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens_q"])
def test_b4_packed_loss_equals_each_document_alone(how):
    from transformers import DataCollatorWithFlattening
    m = _hf()
    docs = _docs()
    coll = DataCollatorWithFlattening(return_flash_attn_kwargs=how == "cu_seq_lens_q",
                                      return_position_ids=how == "position_ids")
    batch = coll([{"input_ids": d.tolist()} for d in docs])
    packed = m(**batch).loss
    total, count = 0.0, 0
    for d in docs:
        n = d.numel() - 1
        total = total + m(d[None], labels=d[None]).loss * n
        count += n
    assert_close("packed loss", packed, total / count, 1e-12)
    plain = m(batch["input_ids"], labels=batch["labels"]).loss   # without the boundaries: the state leaks
    assert (plain - packed).abs() > 1e-6
    # the logits too: each document's positions equal that document alone
    logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    start = 0
    for d in docs:
        assert_close("packed logits", logits[start:start + d.numel()], m(d[None]).logits[0], 1e-12)
        start += d.numel()


def test_b4_packed_gradients_equal_separate():
    from transformers import DataCollatorWithFlattening
    m = _hf().train()
    docs = _docs()
    batch = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
    n_total = sum(d.numel() - 1 for d in docs)
    m.zero_grad()
    m(**batch, num_items_in_batch=n_total).loss.backward()
    g_packed = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    for d in docs:
        m(d[None], labels=d[None], num_items_in_batch=n_total).loss.backward()
    for a, p in zip(g_packed, m.parameters()):
        assert_close("packed grad", a, p.grad, 1e-10)


def test_b4_bad_packing_is_refused():
    m = _hf()
    ids = _ids(2, 8)
    with pytest.raises(ValueError, match="position_ids"):
        m(ids, position_ids=torch.arange(8).repeat(2, 1).flip(1))
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        m(ids[:1], cu_seq_lens_q=torch.tensor([0, 3, 7], dtype=torch.int32))
