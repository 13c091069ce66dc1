"""transformers integration, what a researcher reaches for (issue 21: B5, B6 and the list of small items):
the tokenizer's pad / eos so pipeline batching and lm-eval's HFLM work with no extra arguments, lm-eval
scores against the project's own log-probabilities, the `python -m kop_triton.lm_eval` route, weights
checksums, resize_token_embeddings, gradient checkpointing, output_hidden_states, logits_to_keep
tensors, generate argument checks, and the config's fields from one definition."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import assert_close
from kop_triton import KStackConfig, KStackLM
from kop_triton.tokenizers import ByteTokenizer, CharTokenizer

import kop_triton.hf as hf
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
CFG = dict(d_model=16, n_k2=2, rank=3, kernel_size=4)


def _lm(V, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    m = KStackLM(KStackConfig(vocab_size=V, **{**CFG, **kw})).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("hfdir")
    kop = CharTokenizer(TEXT)
    lm = _lm(kop.vocab_size)
    hf.save_hf(d, lm, kop)
    return d, lm, kop


# ---- tokenizer: pad / eos, pipeline batching, decode range -------------------------------


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tokenizer_has_in_vocabulary_pad_and_eos_and_keeps_them_when_decoding(kind):
    kop = CharTokenizer(TEXT) if kind == "char" else ByteTokenizer()
    tok = hf.hf_tokenizer(kop)
    nl = kop.encode("\n")[0]
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == nl and len(tok) == kop.vocab_size
    assert tok.padding_side == "left"
    ids = kop.encode("All:\nSpeak")
    assert tok.decode(ids, skip_special_tokens=True) == "All:\nSpeak"    # the newline is text
    with pytest.raises(ValueError, match="999"):
        tok.decode([1, 999])
    with pytest.raises((TypeError, ValueError), match="string|str"):
        tok(123)


def test_pipeline_batches_with_left_padding(saved):
    d, lm, kop = saved
    pipe = pipeline("text-generation", model=str(d))
    prompts = ["Speak", "All:\nSpeak, s", "F"]
    batched = pipe(prompts, max_new_tokens=6, do_sample=False, batch_size=3)
    for p, out in zip(prompts, batched):
        want = kop.decode(lm.generate(torch.tensor([kop.encode(p)]), 6, temperature=0)[0].tolist())
        assert out[0]["generated_text"] == want


def test_pipeline_non_text_prompt_is_transformers_own_type_error(saved):
    """pipeline("text-generation")(123) fails in transformers' own preprocessing (it concatenates the
    prompt to a str prefix) before the tokenizer or the model is reached, for any model: a GPT-2
    from a config gives the same TypeError, naming the type received.  That is transformers'
    behaviour, not the kstack model's."""
    from transformers import GPT2Config, GPT2LMHeadModel
    d, lm, kop = saved
    tok = AutoTokenizer.from_pretrained(str(d))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=kop.vocab_size, n_layer=1, n_embd=8, n_head=2, n_positions=32,
                                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    ours = hf.KStackForCausalLM.from_pretrained(str(d)).eval()
    for bad in (123, 1.5):
        msgs = []
        for model in (ours, gpt2):
            with pytest.raises(TypeError) as e:
                pipeline("text-generation", model=model, tokenizer=tok)(bad, max_new_tokens=2)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1] and type(bad).__name__ in msgs[0] and "str" in msgs[0], msgs


# ---- lm-evaluation-harness ----------------------------------------------------------------


def _own_logprob(lm, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(lm(ids)[0].double(), -1)
    return sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lm_eval_hflm_with_no_extra_arguments(saved):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    d, lm, kop = saved
    model = HFLM(pretrained=str(d), batch_size=2, device="cpu")
    pairs = [("Speak", ", speak."), ("All:", "\nSpeak"), ("First Citizen:\nBefore we", " proceed any further")]
    got = model.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, _greedy) in zip(pairs, got):
        assert abs(ll - _own_logprob(lm, kop.encode(ctx), kop.encode(cont))) < 1e-4
    text = "Speak, speak.\nAll:\nhear me"
    rolling = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    nl = kop.encode("\n")                                   # the prefix token: eos / bos = "\n"
    assert abs(rolling - _own_logprob(lm, nl, kop.encode(text))) < 1e-4


_MC_TASK = """task: kstack_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""
_PPL_TASK = """task: kstack_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: byte_perplexity
  - metric: bits_per_byte
  - metric: word_perplexity
"""


def test_lm_eval_command_line_runs_local_tasks_with_our_log_likelihoods(saved, tmp_path):
    """`python -m kop_triton.lm_eval run --model hf --model_args pretrained=DIR` through two local tasks
    (json files, offline): a multiple-choice (loglikelihood) task and a perplexity (loglikelihood_rolling)
    task.  Every log-likelihood lm-eval logs, and its aggregate metrics, equal the saved model's own
    log-probabilities (KStackLM's forward, the model save_hf wrote)."""
    import math
    d, lm, kop = saved
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = [{"ctx": "All:", "choices": ["\nSpeak", " speak", "\nhear"], "label": 0},
          {"ctx": "Before we", "choices": [" proceed", " speak"], "label": 1},
          {"ctx": "First Citizen:\nBefore we", "choices": [" proceed any", " hear me"], "label": 0}]
    ppl = ["Speak, speak.\nAll:\nhear me", "First Citizen:\nBefore we proceed"]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (tasks / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ppl))
    (tasks / "kstack_mc.yaml").write_text(_MC_TASK.format(dir=tasks))
    (tasks / "kstack_ppl.yaml").write_text(_PPL_TASK.format(dir=tasks))
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf_home")}
    r = subprocess.run([sys.executable, "-m", "kop_triton.lm_eval", "run", "--model", "hf", "--model_args",
                        f"pretrained={d}", "--device", "cpu", "--batch_size", "2", "--tasks", "kstack_mc", "kstack_ppl",
                        "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "kstack_mc" in r.stdout and "bits_per_byte" in r.stdout         # lm-eval's results table
    (res_file,) = out.glob("*/results_*.json")
    results = json.loads(res_file.read_text())["results"]
    samples = {t: [json.loads(line) for line in next(out.glob(f"*/samples_{t}_*.jsonl")).read_text().splitlines()]
               for t in ("kstack_mc", "kstack_ppl")}
    correct = 0
    for s in sorted(samples["kstack_mc"], key=lambda s: s["doc_id"]):
        doc = mc[s["doc_id"]]
        got = [float(resp[0][0]) for resp in s["resps"]]
        own = [_own_logprob(lm, kop.encode(doc["ctx"]), kop.encode(c)) for c in doc["choices"]]
        assert max(abs(a - b) for a, b in zip(got, own)) < 1e-5 * max(1.0, max(map(abs, own))), (got, own)
        correct += max(range(len(own)), key=own.__getitem__) == doc["label"]
    assert results["kstack_mc"]["acc,none"] == correct / len(mc)
    nl = kop.encode("\n")                                                  # the prefix token (eos = bos = "\n")
    total = 0.0
    for s in sorted(samples["kstack_ppl"], key=lambda s: s["doc_id"]):
        own = _own_logprob(lm, nl, kop.encode(ppl[s["doc_id"]]))
        got = float(s["resps"][0][0])
        assert abs(got - own) < 1e-5 * max(1.0, abs(own)), (got, own)
        total += own
    n_bytes = sum(len(t.encode("utf-8")) for t in ppl)
    n_words = sum(len(t.split()) for t in ppl)
    want = {"bits_per_byte": -total / n_bytes / math.log(2), "byte_perplexity": math.exp(-total / n_bytes),
            "word_perplexity": math.exp(-total / n_words)}
    for k, v in want.items():
        assert abs(results["kstack_ppl"][k + ",none"] - v) < 1e-4 * v, (k, results["kstack_ppl"], want)


# ---- weights checksum -----------------------------------------------------------------------


def test_flipped_byte_in_hf_weights_is_refused(saved, tmp_path):
    import shutil
    d, lm, kop = saved
    c = tmp_path / "copy"
    shutil.copytree(d, c)
    sums = json.loads((c / hf.CHECKSUM_FILE).read_text())["sha256"]
    assert "model.safetensors" in sums
    AutoModelForCausalLM.from_pretrained(c)                                   # intact: loads
    w = c / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01                                                           # inside the last tensor's data
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        AutoModelForCausalLM.from_pretrained(c)


# ---- B6: resize_token_embeddings, and the crashes ---------------------------------------------


@pytest.mark.parametrize("head", ["linear", "gelu"])
def test_resize_token_embeddings_keeps_the_inner_config(head):
    m = hf.KStackForCausalLM.from_kstack(_lm(65, head=head, head_mult=2))
    m.resize_token_embeddings(70)
    assert m.model.config.vocab_size == m.config.vocab_size == 70
    ids = torch.tensor([[1, 69, 3]])
    with torch.no_grad():
        out = m(ids, labels=ids)
    assert out.logits.shape == (1, 3, 70) and torch.isfinite(out.loss)
    assert m.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)
    with pytest.raises(ValueError, match="adaptive"):
        hf.KStackForCausalLM.from_kstack(_lm(40, head="adaptive", adaptive_cutoffs=[10, 20])).resize_token_embeddings(50)


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(num_beams=0), "num_beams"), (dict(attention_mask=torch.ones(1, 7, dtype=torch.long)), "attention_mask"),
    (dict(attention_mask=torch.full((1, 5), 2)), "attention_mask"),
    (dict(attention_mask=torch.zeros(1, 5, dtype=torch.long)), "attention_mask"),
])
def test_generate_refuses_bad_arguments_naming_them(kw, match):
    m = hf.KStackForCausalLM.from_kstack(_lm(29))
    kw.setdefault("max_new_tokens", 3)
    with pytest.raises(ValueError, match=match):
        m.generate(torch.randint(0, 29, (1, 5)), **kw)


# ---- gradient checkpointing, hidden states, logits_to_keep ---------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    lm = _lm(29, dtype=torch.float64, mlp_dropout=0.1, residual_dropout=0.1)
    m = hf.KStackForCausalLM.from_kstack(lm).train()
    ids = torch.randint(0, 29, (2, 11), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        if ckpt:
            m.gradient_checkpointing_enable()
            assert m.is_gradient_checkpointing and m.model.stack.gradient_checkpointing
        m.zero_grad()
        torch.manual_seed(7)                                   # the same dropout masks (checkpoint replays them)
        m(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert_close("checkpointed grad", b, a, 1e-12)
    m.gradient_checkpointing_disable()
    assert not m.model.stack.gradient_checkpointing


def test_output_hidden_states_and_attentions():
    lm = _lm(29, dtype=torch.float64)
    m = hf.KStackForCausalLM.from_kstack(lm)
    ids = torch.randint(0, 29, (2, 9))
    with torch.no_grad():
        out = m(ids, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == 1 + (lm.config.n_k2 + 3) + 1           # embedding, every block, final norm
        assert torch.equal(hs[-1], lm.hidden(ids))
        assert_close("embedding output", hs[0], lm.emb(ids), 0)
        h = hs[0]
        for i, blk in enumerate(lm.stack.blocks):                # each entry is that block's output
            h = blk(h, kernel=lm.stack.shared_kernel) if i in range(1, 1 + lm.config.n_k2) else blk(h)
            assert_close(f"block {i} output", hs[1 + i], h, 1e-12)
        base = hf.KStackModel(m.config).double()
        base.model.load_state_dict(lm.state_dict())
        assert len(base(ids, output_hidden_states=True).hidden_states) == len(hs)
        gen = m.generate(ids, max_new_tokens=3, do_sample=False, output_hidden_states=True,
                         return_dict_in_generate=True)
        assert gen.hidden_states is not None and len(gen.hidden_states) == 3
    with pytest.raises(ValueError, match="output_attentions"):
        m(ids, output_attentions=True)


def test_logits_to_keep_tensor_selects_positions():
    lm = _lm(29, dtype=torch.float64)
    m = hf.KStackForCausalLM.from_kstack(lm)
    ids = torch.randint(0, 29, (2, 9))
    keep = torch.tensor([0, 4, 8])
    with torch.no_grad():
        assert torch.equal(m(ids, logits_to_keep=keep).logits, lm(ids)[:, keep])
        assert m(ids, logits_to_keep=2).logits.shape == (2, 2, 29)


# ---- ROSA with the cache and its saved defaults; the config's one source -------------------


def test_saved_rosa_model_generates_with_the_default_cache(tmp_path):
    kop = CharTokenizer(TEXT)
    lm = _lm(kop.vocab_size, dtype=torch.float32, rosa="exact", rosa_layers=[1])
    hf.save_hf(tmp_path, lm, kop)
    m = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([kop.encode("Speak, speak.\nSpeak")])
    got = m.generate(ids, max_new_tokens=10, do_sample=False)               # the saved generation config
    assert torch.equal(got, lm.generate(ids, 10, temperature=0))


def test_hf_config_fields_come_from_kstackconfig():
    ann = hf.KStackHFConfig.__annotations__
    import typing
    hints = typing.get_type_hints(KStackConfig)
    for f in dataclasses.fields(KStackConfig):
        assert ann[f.name] == hints[f.name], f.name
    assert set(ann) == {f.name for f in dataclasses.fields(KStackConfig)} | {"use_cache", "tie_word_embeddings"}
    with pytest.raises(Exception, match="vocab_size"):
        hf.KStackHFConfig(vocab_size="x")
