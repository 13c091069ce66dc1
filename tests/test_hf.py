"""transformers integration (kop_triton.hf): config and weights both ways, logits, loss, the recurrent
cache under every generate() strategy (checked against generate(use_cache=False), which re-runs the
parallel form on the whole sequence at every token), left padding, tokenizers, save / load,
pipeline, and the released checkpoint through the HF model and lm-evaluation-harness.

`make test` installs transformers and lm-eval, so these tests do not skip for a missing package (they fail);
the released-checkpoint tests skip only when ../shared is absent."""
import functools
import json
import math

import pytest
import torch

from helpers import SHARED, assert_close
from kop_triton import KStackConfig, KStackLM
from kop_triton.tokenizers import ByteTokenizer, CharTokenizer

import kop_triton.hf as hf  # noqa: E402  (no skip: make test installs transformers)
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

REF_CKPT = SHARED / "reference" / "k-language-model-v2" / "char_shakespeare_v2_rosa_off.pt"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
needs_reference = pytest.mark.skipif(not (REF_CKPT.is_file() and SHAKESPEARE.is_file()),
                                     reason=f"reference checkpoint or Tiny Shakespeare not found under {SHARED}")

CONFIGS = {
    "linear": dict(vocab_size=29, d_model=16, n_k2=2, rank=3, kernel_size=4),
    "gelu-embproj-refine": dict(vocab_size=29, d_model=12, emb_dim=8, n_k2=2, rank=2, kernel_size=3,
                                shared_kernel=False, head="gelu", head_mult=2, refine_steps=2),
    "adaptive": dict(vocab_size=40, d_model=16, n_k2=1, rank=2, kernel_size=5, head="adaptive",
                     adaptive_cutoffs=[10, 20], adaptive_div_value=2.0),
}


def _lm(name="linear", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = KStackLM(KStackConfig(**CONFIGS[name])).to(dtype).eval()
    with torch.no_grad():   # non-trivial decays, gates and alphas
        for mixer in m.mixers():
            mixer.decay_logit.normal_(0, 2)
            mixer.alpha_logit.normal_(0, 1)
            mixer.gate_logit.normal_(0, 1)
    return m


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_and_weights_convert_losslessly(name):
    lm = _lm(name)
    cfg = hf.KStackHFConfig.from_kstack_config(lm.config)
    assert cfg.to_kstack_config() == lm.config
    model = hf.KStackForCausalLM.from_kstack(lm)
    back = model.to_kstack()
    for (k, a), (k2, b) in zip(lm.state_dict().items(), back.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    ids = torch.randint(0, lm.config.vocab_size, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lm(ids))
        assert_close("last logits", model(ids, logits_to_keep=1).logits, lm(ids)[:, -1:], 1e-12)
        base = hf.KStackModel(cfg).to(torch.float64)
        base.model.load_state_dict(lm.state_dict())
        assert torch.equal(base(ids).last_hidden_state, lm.hidden(ids))


def test_config_declares_every_kstack_field_with_its_default():
    import dataclasses
    cfg = hf.KStackHFConfig()
    for f in dataclasses.fields(KStackConfig):
        assert f.name in hf.KStackHFConfig.__annotations__, f"KStackHFConfig lacks KStackConfig.{f.name}"
        if f.name != "vocab_size":
            assert getattr(cfg, f.name) == f.default, f.name


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="rank"):
        hf.KStackHFConfig(vocab_size=10, rank=0)
    with pytest.raises(ValueError, match="head"):
        hf.KStackHFConfig(vocab_size=10, head="softmax")
    with pytest.raises(TypeError, match="KStackConfig"):
        hf.KStackHFConfig.from_kstack_config({"vocab_size": 10})


def test_loss_shifts_labels_and_ignores_minus_100():
    lm = _lm()
    model = hf.KStackForCausalLM.from_kstack(lm)
    ids = torch.randint(0, 29, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        logits = lm(ids)
    keep = labels[:, 1:] != -100
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert_close("loss", out.loss, nll[keep].mean(), 1e-12)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, :5])


def test_greedy_generate_equals_kstacklm_and_steps_the_state():
    lm = _lm(dtype=torch.float32)
    model = hf.KStackForCausalLM.from_kstack(lm)
    prompt = torch.randint(0, 29, (3, 9))
    out = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, lm.generate(prompt, 20, temperature=0))
    # the cache is the recurrent state of the whole sequence: 9 + 19 consumed positions
    res = model.generate(prompt, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    cache = res.past_key_values
    assert isinstance(cache, hf.KStackCache) and cache.get_seq_length() == 28
    # the token steps ran under inference mode; the state handed out is made of ordinary tensors
    assert not any(t.is_inference() for s in cache.state for t in s)
    with torch.no_grad():
        _, state = lm.prefill(out[:, :-1])
    for a, b in zip(cache.state, state):
        assert_close("scan state", a.scan, b.scan, 1e-5)
        assert_close("conv state", a.conv, b.conv, 1e-6)


@pytest.mark.parametrize("kw", [
    dict(do_sample=True, temperature=0.7, top_k=5),
    dict(do_sample=True, top_p=0.8, repetition_penalty=1.3),
    dict(do_sample=True, temperature=1.5, num_return_sequences=3),
    dict(do_sample=False, repetition_penalty=1.5),
    dict(num_beams=3, do_sample=False),
    dict(num_beams=2, do_sample=True, num_return_sequences=2),
], ids=["temperature-topk", "topp-repetition", "num-return-sequences", "greedy-repetition", "beam", "beam-sample"])
def test_cached_generate_equals_rerunning_the_sequence(kw):
    model = hf.KStackForCausalLM.from_kstack(_lm("gelu-embproj-refine"))
    prompt = torch.randint(0, 29, (2, 7))
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        outs.append(model.generate(prompt, max_new_tokens=12, use_cache=use_cache, **kw))
    assert outs[0].shape[1] == 19
    assert torch.equal(outs[0], outs[1])


def test_left_padding_gives_the_unpadded_continuation():
    lm = _lm()                                      # float64: no near-tie can flip a greedy token
    model = hf.KStackForCausalLM.from_kstack(lm)
    prompts = [torch.randint(0, 29, (n,)) for n in (9, 4, 9, 1)]
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), 3)          # pad id 3: a real token, so masking must work
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    for i, p in enumerate(prompts):
        alone = lm.generate(p[None], 15, temperature=0)
        assert torch.equal(out[i, T:], alone[0, len(p):]), i
    with torch.no_grad():                           # logits of the real positions are those of the unpadded rows
        logits = model(ids, attention_mask=mask).logits
    assert_close("padded row logits", logits[1, T - 4:], lm(prompts[1][None])[0], 1e-12)
    bad = mask.clone()
    bad[0, 3] = 0                                   # a hole in the middle
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=bad)


@pytest.mark.parametrize("kw, name", [(dict(penalty_alpha=0.6, top_k=4), "contrastive search"),
                                      (dict(prompt_lookup_num_tokens=3), "prompt-lookup"),
                                      (dict(num_beams=4, num_beam_groups=2), "group beam search")])
def test_unsupported_strategies_fail_at_once(kw, name):
    model = hf.KStackForCausalLM.from_kstack(_lm(dtype=torch.float32))
    with pytest.raises(ValueError, match=name):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4, **kw)
    with pytest.raises(ValueError, match="cropped"):
        hf.KStackCache().crop(2)


def test_cache_reorder_and_select():
    lm = _lm()
    with torch.no_grad():
        _, state = lm.prefill(torch.randint(0, 29, (3, 5)))
    cache = hf.KStackCache(state, 5)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(cache.state[1].scan[0], state[1].scan[2])
    assert torch.equal(cache.state[0].conv[2], state[0].conv[0])
    cache.batch_repeat_interleave(2)
    assert cache.state[0].scan.shape[0] == 6
    cache.batch_select_indices(torch.tensor([5]))
    assert torch.equal(cache.state[0].scan[0], state[0].scan[0])


def test_bad_inputs():
    model = hf.KStackForCausalLM.from_kstack(_lm())
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(torch.zeros(1, 2, dtype=torch.long), inputs_embeds=torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="KStackCache"):
        model(torch.zeros(1, 2, dtype=torch.long), past_key_values=object())
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 3))


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def test_tokenizers_match_kop_tokenizers():
    kop = CharTokenizer(TEXT)
    tok = hf.hf_tokenizer(kop)
    assert tok("hear me")["input_ids"] == kop.encode("hear me")
    assert tok.decode(kop.encode(TEXT)) == TEXT
    with pytest.raises(ValueError, match="not in this char"):
        tok("xyz~")
    byte = hf.hf_tokenizer(ByteTokenizer())
    s = "naïve – ok\n"
    assert byte(s)["input_ids"] == ByteTokenizer().encode(s)
    assert byte.decode(ByteTokenizer().encode(s)) == s
    assert byte.vocab_size == 256 and tok.vocab_size == kop.vocab_size


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_save_pretrained_round_trip_and_pipeline(tmp_path, kind):
    kop_tok = CharTokenizer(TEXT) if kind == "char" else ByteTokenizer()
    torch.manual_seed(0)
    lm = KStackLM(KStackConfig(vocab_size=kop_tok.vocab_size, d_model=16, n_k2=2, rank=3, kernel_size=4)).eval()
    hf.save_hf(tmp_path, lm, kop_tok)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model, hf.KStackForCausalLM)
    for (k, a), b in zip(lm.state_dict().items(), model.model.state_dict().values()):
        assert torch.equal(a, b), k
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tok) is (hf.KStackCharTokenizer if kind == "char" else hf.KStackByteTokenizer)
    s = "Speak, speak.\nAll:"
    assert tok(s)["input_ids"] == kop_tok.encode(s) and tok.decode(kop_tok.encode(s)) == s
    saved = json.load(open(tmp_path / "tokenizer_config.json"))
    assert saved["tokenizer_class"] == type(tok).__name__
    base = AutoModel.from_pretrained(tmp_path)
    ids = torch.tensor([kop_tok.encode("Speak, speak.")])
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, lm.hidden(ids))
    pipe = pipeline("text-generation", model=str(tmp_path))
    text = pipe("Speak", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    want = kop_tok.decode(lm.generate(torch.tensor([kop_tok.encode("Speak")]), 12, temperature=0)[0].tolist())
    assert text == want


# ---- the released reference checkpoint ------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from kop_triton.convert import convert, main
    from kop_triton.eval import validation_ids
    d = tmp_path_factory.mktemp("ref")
    assert main([str(REF_CKPT), str(d / "hf"), "--tokenizer", "char", "--text", str(SHAKESPEARE),
                 "--gamma-min", "0.05", "--alpha-cap", "1.0", "--format", "hf"]) == 0
    lm, tok = convert(REF_CKPT, d / "kop", tokenizer="char", text=SHAKESPEARE, gamma_min=0.05, alpha_cap=1.0)
    model = AutoModelForCausalLM.from_pretrained(d / "hf").eval()
    val = validation_ids(tok, SHAKESPEARE.read_text(encoding="utf-8"))
    return lm.eval(), tok, model, d / "hf", val


@needs_reference
def test_reference_logits_and_greedy_generate(reference):
    lm, tok, model, _, val = reference
    ids = val[:2048][None]
    with torch.no_grad():
        a, b = lm(ids), model(ids).logits
    rel = float((a - b).norm() / a.norm())
    assert rel <= 1e-6, rel
    prompt = torch.tensor([tok.encode("ROMEO:\n")])
    assert torch.equal(model.generate(prompt, max_new_tokens=60, do_sample=False), lm.generate(prompt, 60, temperature=0))


@needs_reference
def test_reference_val_ce_through_hf(reference):
    from kop_triton.eval import evaluate
    lm, _, model, _, val = reference
    W = 2048
    n = (val.numel() - 1) // W
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 8):
            idx = torch.arange(i, min(i + 8, n))
            x = val[idx[:, None] * W + torch.arange(W + 1)[None]]     # (b, W + 1): W inputs, W shifted labels
            total += float(model(x, labels=x).loss.double()) * len(idx) * W
    ce = total / (n * W)
    ours = evaluate(lm, val, window=W)["val_ce"]
    assert abs(ce - ours) < 1e-6, (ce, ours)
    assert abs(ce - 1.4671) < 5e-5, ce            # the released score


@needs_reference
def test_lm_eval_harness_rolling_loglikelihood(reference):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from kop_triton.eval import evaluate
    lm, tok, model, d, val = reference
    W, n = 512, 4
    text = tok.decode(val[:W * n].tolist())
    hf_tok = AutoTokenizer.from_pretrained(d)
    prefix = tok.encode("\n")[0]
    harness = HFLM(pretrained=model, backend="causal", tokenizer=hf_tok, max_length=W, batch_size=1, device="cpu",
                   prefix_token_id=prefix)
    (ll,) = harness.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ce_harness = -ll / (W * n)
    # kop-triton's own evaluation of the same windows: [prefix] + text in windows of W from a zero state
    ids = torch.tensor([prefix] + tok.encode(text))
    ce_ours = evaluate(lm, ids, window=W)["val_ce"]
    assert abs(ce_harness - ce_ours) < 1e-4, (ce_harness, ce_ours)
    assert math.isfinite(ce_ours) and 1.0 < ce_ours < 2.5


def test_rosa_model_through_transformers():
    """A ROSA model: the loss and logits through HF equal KStackLM's (ROSA from the ids); generate
    without a cache re-runs the sequence and equals KStackLM.generate greedy (its streaming
    automaton over the whole history); with the cache (the default; the RosaStream in KStackCache)
    the same tokens, greedy and seeded-sampled; beam search with the cache is refused, naming ROSA."""
    torch.manual_seed(0)
    lm = KStackLM(KStackConfig(vocab_size=11, d_model=16, n_k2=2, rank=4, kernel_size=4, rosa="exact",
                               rosa_layers=[1])).double().eval()
    model = hf.KStackForCausalLM.from_kstack(lm)
    assert model.config.rosa == "exact" and model.config.rosa_layers == [1]
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 4, 5, 1, 2]])
    out = model(ids, labels=ids)
    assert_close("hf rosa logits", out.logits, lm(ids), 1e-12)
    assert_close("hf rosa loss", out.loss, lm(ids[:, :-1], ids[:, 1:]), 1e-12)
    got = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    want = lm.generate(ids, max_new_tokens=8, temperature=0.0)
    assert torch.equal(got, want)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want)
    o = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(o.past_key_values.state[-1], hf.RosaStream)
    more = torch.cat([o.sequences, torch.tensor([[3, 1]])], 1)    # continued from the returned cache
    assert torch.equal(model.generate(more, past_key_values=o.past_key_values, max_new_tokens=4, do_sample=False),
                       lm.generate(more, max_new_tokens=4, temperature=0.0))
    for use_cache in (True, False):
        torch.manual_seed(5)
        s = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, use_cache=use_cache)
        if use_cache:
            sampled = s
    assert torch.equal(sampled, s)
    with pytest.raises(ValueError, match="ROSA"):
        model.generate(ids, max_new_tokens=2, do_sample=False, num_beams=2)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded-mask"])
def test_generate_fast_step_equals_plain_forward_loop(padded, monkeypatch):
    """generate()'s token steps go through the prepared step (``_fast_step``) and the attention mask
    stops growing after the prefill; the tokens equal a greedy loop over the plain forward with
    the same cache (the checked path through ``KStackLM.step``), with and without padding."""
    lm = _lm()
    model = hf.KStackForCausalLM.from_kstack(lm)
    ids = torch.randint(0, 29, (3, 8))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        mask[2, :7] = 0
    calls, mask_lengths = [], []
    fast, prep = hf.KStackForCausalLM._fast_step, hf.KStackForCausalLM.prepare_inputs_for_generation
    monkeypatch.setattr(hf.KStackForCausalLM, "_fast_step", lambda self, *a: calls.append(1) or fast(self, *a))

    @functools.wraps(prep)                               # generate reads its signature
    def spy(self, input_ids, **kw):
        if kw.get("attention_mask") is not None:
            mask_lengths.append(kw["attention_mask"].shape[1])
        return prep(self, input_ids, **kw)
    monkeypatch.setattr(hf.KStackForCausalLM, "prepare_inputs_for_generation", spy)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert len(calls) == 9                               # every token after the prefill's
    if padded:
        assert mask_lengths and set(mask_lengths) == {8}  # never grown
    with torch.no_grad():
        res = model(ids, attention_mask=mask, use_cache=True)
        cache, seq = res.past_key_values, [res.logits[:, -1].argmax(-1)]
        for _ in range(9):
            res = model(seq[-1][:, None], past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            seq.append(res.logits[:, -1].argmax(-1))
    assert len(calls) == 9                               # outside generate: the checked path
    assert torch.equal(out[:, 8:], torch.stack(seq, 1))


def test_generate_refuses_a_cache_of_another_shape():
    model = hf.KStackForCausalLM.from_kstack(_lm())
    other = hf.KStackForCausalLM.from_kstack(_lm("adaptive"))
    with torch.no_grad():
        cache = other(torch.randint(0, 29, (1, 4)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="state"):
        model.generate(torch.randint(0, 29, (1, 5)), past_key_values=cache, max_new_tokens=3, do_sample=False)
