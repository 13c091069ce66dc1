"""Hugging Face ``transformers`` integration (``pip install kop-triton[hf]``).

    import kop_triton.hf                      # registers the "kstack" model type with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    model = AutoModelForCausalLM.from_pretrained(DIR)
    pipe = pipeline("text-generation", model=DIR)

- ``KStackHFConfig``: a ``PreTrainedConfig`` (model type "kstack") carrying every ``KStackConfig``
  field; ``to_kstack_config()`` / ``from_kstack_config()`` convert both ways.
- ``KStackForCausalLM`` (``PreTrainedModel`` + ``GenerationMixin``) and ``KStackModel`` (hidden
  states) hold a ``KStackLM`` as ``.model``: the same modules and weights, so ``from_kstack`` /
  ``to_kstack`` are lossless copies and the logits are those of ``KStackLM``.
- ``KStackCache``: the model's recurrent state (what ``KStackLM.prefill`` / ``step`` return: one
  ``KOperatorState`` per K2 layer and pass) inside a ``transformers`` ``Cache``; ``generate()``
  prefills the prompt once through the parallel form and then steps the state, one step per
  token: inside ``generate`` the forward sends each token step straight to the model's prepared
  step (``decode.StepPlan.step_lists``: one scripted module, the plan checked once per call),
  and the attention mask stops growing once the state holds the prompt.  Transformers' own loop
  is untouched (logits processors, stopping criteria, streamers; it still appends each token to
  ``input_ids``, a copy that grows with the context).  Beam search reorders the states; strategies that crop the cache
  (assisted / prompt-lookup decoding) or need hidden states of past tokens (contrastive search,
  DoLa) fail at once with a ``ValueError`` naming the strategy.
- Left padding: with an ``attention_mask`` the prompt rows are run on their unpadded tokens only
  (grouped by length), so padded positions never enter the state.
- ``KStackCharTokenizer`` / ``KStackByteTokenizer``: the char and byte tokenizers of
  ``kop_triton.tokenizers`` as ``transformers`` tokenizers, saved beside the model.
- ``save_hf(directory, model, tokenizer)`` writes a directory that ``from_pretrained`` and
  ``pipeline`` read; ``python -m kop_triton.convert ... --format hf`` writes one from a reference
  checkpoint.

Tested with transformers 5.23 (the range pinned in setup.py's ``hf`` extra).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from typing import List, Optional

import torch
import torch.nn.functional as F

try:
    import transformers
    from huggingface_hub.dataclasses import strict
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin,
                              PreTrainedConfig, PreTrainedModel, PreTrainedTokenizer)
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - the hf extra is installed by `make test`
    raise ImportError("kop_triton.hf needs transformers: pip install 'kop-triton[hf]'") from e

from .model import KStackConfig, KStackLM
from .modules import KOperatorState
from .ops._checks import describe
from .tokenizers import ByteTokenizer, CharTokenizer

MODEL_TYPE = "kstack"
_FIELDS = [f.name for f in dataclasses.fields(KStackConfig)]


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@strict(accept_kwargs=True)
class KStackHFConfig(PreTrainedConfig):
    """Every ``KStackConfig`` field (same names and defaults; ``vocab_size`` defaults to 256)."""

    model_type = MODEL_TYPE
    vocab_size: int = 256
    d_model: int = 64
    emb_dim: Optional[int] = None
    n_k2: int = 6
    rank: int = 4
    kernel_size: int = 8
    shared_kernel: bool = True
    gamma_min: float = 0.05
    gamma_max: float = 1.0
    alpha_cap: float = 1.0
    head: str = "linear"
    head_mult: int = 6
    adaptive_cutoffs: Optional[List[int]] = None
    adaptive_div_value: float = 4.0
    emb_dropout: float = 0.0
    mlp_dropout: float = 0.0
    residual_dropout: float = 0.0
    head_dropout: float = 0.0
    refine_steps: int = 0
    backend: str = "auto"
    window: int = 2048
    rosa: str = "off"
    rosa_layers: Optional[List[int]] = None
    use_cache: bool = True
    tie_word_embeddings: bool = False      # the linear head reads the embedding directly: nothing to tie

    def __post_init__(self, **kwargs):
        self.to_kstack_config()            # validates every field with KStackConfig's checks
        super().__post_init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_k2 + 3

    def to_kstack_config(self) -> KStackConfig:
        d = {name: getattr(self, name) for name in _FIELDS if hasattr(self, name)}
        for name in ("gamma_min", "gamma_max", "alpha_cap", "adaptive_div_value", "emb_dropout", "mlp_dropout",
                     "residual_dropout", "head_dropout"):
            if isinstance(d[name], int) and not isinstance(d[name], bool):
                d[name] = float(d[name])
        for name in ("adaptive_cutoffs", "rosa_layers"):
            if d[name] is not None:
                d[name] = list(d[name])
        return KStackConfig(**d)

    @classmethod
    def from_kstack_config(cls, config: KStackConfig, **kwargs) -> "KStackHFConfig":
        if not isinstance(config, KStackConfig):
            raise TypeError(f"config must be a KStackConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **kwargs)


# --------------------------------------------------------------------------------------
# Cache: the recurrent state
# --------------------------------------------------------------------------------------


def _map_state(state, fn):
    """Apply ``fn`` to every tensor of a model state (nested tuples / named tuples, batch dim 0)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_map_state(s, fn) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_map_state(s, fn) for s in state)
    if state is None:
        return None
    raise TypeError(f"model state holds an unsupported {type(state).__name__}")


def _leaves(state) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    _map_state(state, lambda t: out.append(t) or t)
    return out


def _rebuild(state, leaves):
    it = iter(leaves)
    return _map_state(state, lambda _t: next(it))


class KStackCache(Cache):
    """The recurrent state of a ``KStackForCausalLM`` for ``generate()``.

    ``state`` is what ``KStackLM.prefill`` / ``step`` return (every tensor batch-first);
    ``seen_tokens`` counts the positions consumed.  It does not grow with the context.
    ``generate()``'s token steps keep the state as two lists (scan states, conv states: what
    ``decode.StepPlan.step_lists`` takes and returns); ``state`` builds the tuple of
    ``KOperatorState`` from them when it is read.
    """

    is_compileable = False

    def __init__(self, state=None, seen_tokens: int = 0):
        super().__init__(layers=[])
        self.state = state
        self.seen_tokens = seen_tokens

    @property
    def state(self):
        if self._state is None and self._lists is not None:
            scan, conv = self._lists
            if any(t.is_inference() for t in scan + conv):           # made by generate's token steps: the
                with torch.inference_mode(False):                     # caller gets ordinary tensors
                    scan, conv = [t.clone() for t in scan], [t.clone() for t in conv]
                self._lists = (scan, conv)
            self._state = tuple(map(KOperatorState, scan, conv))
        return self._state

    @state.setter
    def state(self, value):
        self._state, self._lists, self._checked = value, None, None

    def _state_lists(self):
        """(scan states, conv states) of a state without a RosaStream."""
        if self._lists is None:
            self._lists = ([s[0] for s in self._state], [s[1] for s in self._state])
        return self._lists

    def __repr__(self):
        n = 0 if self.state is None else len(self.state)
        return f"KStackCache(states={n}, seen_tokens={self.seen_tokens})"

    def __len__(self):
        return 0 if self._state is None and self._lists is None else len(self.state)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return query_length, 0

    def has_previous_state(self, layer_idx=None, state_idx=None) -> bool:
        return self._state is not None or self._lists is not None

    def reset(self):
        self.state, self.seen_tokens = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row i of the new state is row ``beam_idx[i]`` of the old one."""
        if self.state is not None:
            self.state = _map_state(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        if self.state is not None:
            self.state = _map_state(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        if self.state is not None:
            self.state = _map_state(self.state, lambda t: t[indices])

    def crop(self, max_length: int):
        raise ValueError("KStackCache cannot be cropped: a recurrent state cannot return to an earlier position, "
                         "so assisted generation, prompt-lookup and other speculative decoding are not supported")

    def offload(self, *args, **kwargs):
        raise ValueError("KStackCache does not support offloading (its state is a few KB per sequence)")


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

# generate() options of the strategies a recurrent state cannot serve, with their names
_UNSUPPORTED = (("penalty_alpha", "contrastive search"), ("dola_layers", "DoLa decoding"),
                ("num_beam_groups", "group beam search"), ("constraints", "constrained beam search"),
                ("force_words_ids", "constrained beam search"), ("assistant_model", "assisted generation"),
                ("prompt_lookup_num_tokens", "prompt-lookup decoding"), ("assistant_early_exit", "early-exit "
                                                                         "assisted generation"))


_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(CausalLMOutputWithPast))


def _lm_output(logits, cache) -> CausalLMOutputWithPast:
    """``CausalLMOutputWithPast(logits=logits, past_key_values=cache)`` without its dataclass
    machinery (13 us a token on the dev CPU, against under 1 us): the same attributes and
    items, set directly (tests check it equals the constructed one)."""
    out = CausalLMOutputWithPast.__new__(CausalLMOutputWithPast)
    attrs = out.__dict__
    for name in _OUTPUT_FIELDS:
        attrs[name] = None
    attrs["logits"], attrs["past_key_values"] = logits, cache
    OrderedDict.__setitem__(out, "logits", logits)
    OrderedDict.__setitem__(out, "past_key_values", cache)
    return out


class KStackPreTrainedModel(PreTrainedModel):
    config_class = KStackHFConfig
    base_model_prefix = "kstack"           # no such attribute: KStackModel and KStackForCausalLM share key names
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["K1Block", "K2Block", "K0Block"]
    _is_stateful = True

    def __init__(self, config: KStackHFConfig):
        super().__init__(config)
        self.model = KStackLM(config.to_kstack_config())
        self.post_init()

    def _init_weights(self, module):
        """KStackLM initialises its own parameters (SPEC section 2) when it is built."""

    def get_input_embeddings(self):
        return self.model.emb

    def set_input_embeddings(self, value):
        self.model.emb = value

    # ---- conversion ------------------------------------------------------------------
    @classmethod
    def from_kstack(cls, lm: KStackLM, **config_kwargs):
        """A copy of ``lm`` (weights copied exactly) as this class."""
        if not isinstance(lm, KStackLM):
            raise TypeError(f"lm must be a KStackLM, got {type(lm).__name__}")
        p = next(lm.parameters())
        out = cls(KStackHFConfig.from_kstack_config(lm.config, **config_kwargs)).to(device=p.device, dtype=p.dtype)
        out.model.load_state_dict(lm.state_dict(), strict=True)     # same dtype: an exact copy
        return out.train(lm.training)

    def to_kstack(self) -> KStackLM:
        """A ``KStackLM`` copy of this model's weights."""
        p = next(self.model.parameters())
        lm = KStackLM(self.config.to_kstack_config()).to(device=p.device, dtype=p.dtype)
        lm.load_state_dict(self.model.state_dict(), strict=True)
        return lm.train(self.training)

    # ---- running ----------------------------------------------------------------------
    def _check_inputs(self, input_ids, inputs_embeds):
        if inputs_embeds is not None:
            raise ValueError("KStack models take input_ids, not inputs_embeds")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be a non-empty (B, T) int tensor, got {describe(input_ids)}")

    def _prompt(self, ids, attention_mask, want_state):
        """ids (B, T) from a zero state -> (hidden (B, T, D), state or None).  With a left-padding
        ``attention_mask`` each row runs on its unpadded tokens only (rows grouped by length); the
        hidden states of padded positions are zeros."""
        lm = self.model
        if attention_mask is None:
            return lm.hidden(ids, return_state=True) if want_state else (lm.hidden(ids), None)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got "
                             f"{describe(attention_mask)}")
        mask = attention_mask.to(torch.bool)
        B, T = ids.shape
        lengths = mask.sum(1)                                         # (B,)
        left_pad = torch.arange(T, device=mask.device)[None, :] >= (T - lengths)[:, None]
        if not torch.equal(mask, left_pad):
            raise ValueError("attention_mask must be left padding (each row: zeros, then ones); KStack models "
                             "support no other masks: padded positions must not enter the recurrent state")
        if bool((lengths == 0).any()):
            raise ValueError("attention_mask has a row of zeros only (an empty prompt)")
        if bool((lengths == T).all()):
            return lm.hidden(ids, return_state=True) if want_state else (lm.hidden(ids), None)
        h = None
        groups = []
        for L in sorted(set(lengths.tolist())):
            rows = (lengths == L).nonzero()[:, 0]
            if want_state:
                hr, sr = lm.hidden(ids[rows, T - L:], return_state=True)
            else:
                hr, sr = lm.hidden(ids[rows, T - L:]), None
            if h is None:
                h = hr.new_zeros(B, T, hr.shape[-1])
            h[rows, T - L:] = hr
            groups.append((rows, sr))
        if not want_state:
            return h, None
        template = groups[0][1]
        out = [t.new_empty((B,) + tuple(t.shape[1:])) for t in _leaves(template)]
        for rows, sr in groups:
            for o, t in zip(out, _leaves(sr)):
                o[rows] = t
        return h, _rebuild(template, out)

    def _run(self, input_ids, attention_mask, past_key_values, use_cache, inputs_embeds, want_hidden=False):
        """-> (hidden or None, last-position logits or None, cache or None)."""
        self._check_inputs(input_ids, inputs_embeds)
        rosa = self.model.config.rosa != "off"
        if use_cache is None:
            use_cache = self.config.use_cache and not rosa          # a ROSA model has no cache (below)
        if use_cache and rosa:
            raise NotImplementedError(
                f"the transformers cache does not carry ROSA's automaton (rosa={self.model.config.rosa!r}): "
                "call with use_cache=False (generate(..., use_cache=False) re-runs the sequence), or use "
                "KStackLM.generate / kop-generate --rosa, which stream it")
        cache = past_key_values
        if cache is not None and not isinstance(cache, KStackCache):
            raise TypeError(f"past_key_values must be a KStackCache (the recurrent state), got {type(cache).__name__}")
        state = None if cache is None else cache.state
        T = input_ids.shape[1]
        h = step_logits = None
        if state is None:
            h, new = self._prompt(input_ids, attention_mask, want_state=use_cache)
        elif T == 1 and not want_hidden:                              # one generated token: the recurrent step
            step_logits, new = self.model.step(input_ids[:, 0], state)
        else:                                                         # a continuation: parallel form from the state
            h, new = self.model.hidden(input_ids, state=state, return_state=True)
        if use_cache:
            cache = KStackCache() if cache is None else cache
            cache.state, cache.seen_tokens = new, cache.seen_tokens + T
        else:
            cache = None
        return h, step_logits, cache


class KStackModel(KStackPreTrainedModel):
    """The K-Stack without its head: ``last_hidden_state`` is the final-normed hidden state (B, T, D)."""

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None,
                inputs_embeds=None, return_dict=None, **kwargs):
        h, _, cache = self._run(input_ids, attention_mask, past_key_values, use_cache, inputs_embeds,
                                want_hidden=True)
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=cache)


class KStackForCausalLM(KStackPreTrainedModel, GenerationMixin):
    """K-Stack language model for ``transformers``: logits (B, T, V) (log-probabilities for the
    adaptive head), ``loss`` with labels (shifted inside, -100 ignored), the recurrent state as
    ``past_key_values`` (a ``KStackCache``)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                       # the forward creates its KStackCache

    def get_output_embeddings(self):
        return None                        # the linear head reads model.emb.weight: nothing separate to tie

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        if past_key_values is not None and past_key_values.has_previous_state():
            input_ids, attention_mask = input_ids[:, -1:], None      # one new token per step
        elif next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        out = {"input_ids": input_ids.contiguous(), "past_key_values": past_key_values,
               "attention_mask": attention_mask}
        for key in ("use_cache", "logits_to_keep"):
            if key in kwargs:
                out[key] = kwargs[key]
        return out

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        """As ``GenerationMixin``'s, except that once the cache holds the state the attention mask is
        no longer grown: the prompt's padding is already kept out of the state, and the token steps
        do not read the mask (growing it costs a copy of the whole mask per token)."""
        cache = getattr(outputs, "past_key_values", None)
        if isinstance(cache, KStackCache) and cache.has_previous_state() and "attention_mask" in model_kwargs:
            mask = model_kwargs.pop("attention_mask")
            model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                       num_new_tokens)
            model_kwargs["attention_mask"] = mask
            return model_kwargs
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``; refuses the strategies a recurrent state cannot serve.

        While it runs, the token steps of the cache path go straight to the model's prepared step
        (``decode.StepPlan.step_lists``, checked once here for this call's weights and modes)."""
        cfg = kwargs.get("generation_config") or self.generation_config
        for key, name in _UNSUPPORTED:
            val = kwargs.get(key, getattr(cfg, key, None))
            if val is not None and not (key == "num_beam_groups" and val == 1):
                raise ValueError(f"{name} ({key}={val!r}) is not supported by KStack models: it needs to crop or "
                                 f"re-read a cache, and the recurrent state only moves forward")
        previous = self.__dict__.get("_gen_plan")
        plan = None
        if self.model.config.rosa == "off":
            with torch.no_grad():                                     # as generate runs
                plan = self.model._step_plan()
            if plan is not None and plan.fused is None:
                plan = None
        self.__dict__["_gen_plan"] = plan
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.__dict__["_gen_plan"] = previous

    def _fast_step(self, plan, input_ids, cache):
        """One generated token per row through the prepared step: (B, 1) -> CausalLMOutputWithPast."""
        if cache._checked is not plan:                                # once per state handed in
            plan.check(cache.state, input_ids.shape[0])
            cache._checked = plan
        with torch.inference_mode():                                  # 0.2x less CPU per step than under no_grad
            logits, scan, conv = plan.step_lists(input_ids.reshape(-1), *cache._state_lists())
        cache._state, cache._lists = None, (scan, conv)
        cache.seen_tokens += 1
        return _lm_output(logits.unsqueeze(1), cache)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None, use_cache=None,
                inputs_embeds=None, return_dict=None, logits_to_keep=0, **kwargs):
        plan = self.__dict__.get("_gen_plan")
        if (plan is not None and labels is None and inputs_embeds is None and type(past_key_values) is KStackCache
                and use_cache is not False and past_key_values.has_previous_state()
                and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 1
                and not torch.is_grad_enabled()):
            return self._fast_step(plan, input_ids, past_key_values)       # inside generate: a token step
        h, step_logits, cache = self._run(input_ids, attention_mask, past_key_values, use_cache, inputs_embeds)
        lm = self.model
        if step_logits is not None:
            logits = step_logits[:, None]                             # (B, 1, V)
        elif labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = lm.logits_from_hidden(h[:, -logits_to_keep:])
        else:
            logits = lm.logits_from_hidden(h)                         # (B, T, V)
        loss = None
        if labels is not None:
            if logits.shape[:2] != labels.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(logits.shape[:2])}, got "
                                 f"{describe(labels)}")
            shifted = logits[:, :-1]
            if shifted.dtype in (torch.float16, torch.bfloat16):   # the softmax reduction in float32
                shifted = shifted.float()
            loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------


class KStackCharTokenizer(PreTrainedTokenizer):
    """Char vocabulary (``kop_triton.tokenizers.CharTokenizer``): id = position in the sorted chars.
    A character outside the vocabulary is an error, as in kop-triton's own tokenizer."""

    vocab_files_names = {"vocab_file": "kstack_chars.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, chars: Optional[str] = None, **kwargs):
        if chars is None:
            if vocab_file is None:
                raise ValueError("KStackCharTokenizer needs chars or a vocab_file")
            try:
                with open(vocab_file, encoding="utf-8") as f:
                    chars = json.load(f)["chars"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{vocab_file}: not a kstack char vocabulary (UTF-8 JSON with a 'chars' string): "
                                 f"{type(e).__name__}: {e}") from None
        self._tok = CharTokenizer(chars)
        if self._tok.chars != chars:
            raise ValueError("chars must be a string of sorted unique characters")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def get_vocab(self):
        vocab = {c: i for i, c in enumerate(self._tok.chars)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        self._tok.encode(text)                                        # raises on a character outside the vocabulary
        return list(text)

    def _convert_token_to_id(self, token):
        return self._tok.encode(token)[0]

    def _convert_id_to_token(self, index):
        return self._tok.chars[index]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "kstack_chars.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"chars": self._tok.chars}, f, ensure_ascii=False)
        return (path,)


class KStackByteTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes, ids 0..255 (``kop_triton.tokenizers.ByteTokenizer``); tokens are chr(byte)."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs):
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self):
        vocab = {chr(i): i for i in range(256)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token):
        if len(token) != 1 or ord(token) > 255:
            raise ValueError(f"{token!r} is not a byte token")
        return ord(token)

    def _convert_id_to_token(self, index):
        return chr(index)

    def convert_tokens_to_string(self, tokens):
        return bytes(ord(t) for t in "".join(tokens)).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()


def hf_tokenizer(tokenizer, **kwargs):
    """A kop-triton char or byte tokenizer as a ``transformers`` tokenizer."""
    if isinstance(tokenizer, CharTokenizer):
        return KStackCharTokenizer(chars=tokenizer.chars, **kwargs)
    if isinstance(tokenizer, ByteTokenizer):
        return KStackByteTokenizer(**kwargs)
    raise ValueError(f"only char and byte tokenizers convert to transformers tokenizers, got "
                     f"{type(tokenizer).__name__}")


def save_hf(directory, model: KStackLM, tokenizer, overwrite: bool = False) -> "KStackForCausalLM":
    """Write ``model`` + ``tokenizer`` (kop-triton char/byte) as a transformers directory; returns the HF model.

    ``directory`` must be new or empty, or (``overwrite=True``) hold an HF kstack model, which is
    then replaced atomically: the files are written to a temporary sibling first, so a failure
    leaves the old directory byte-identical."""
    from .checkpoint import check_destination, staged_directory
    check_destination(directory, "directory", "hf", overwrite=overwrite, replace_flag="overwrite=True")
    hf = KStackForCausalLM.from_kstack(model)
    tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizer) else hf_tokenizer(tokenizer)
    with staged_directory(directory) as tmp:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return hf


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------

AutoConfig.register(MODEL_TYPE, KStackHFConfig, exist_ok=True)
AutoModel.register(KStackHFConfig, KStackModel, exist_ok=True)
AutoModelForCausalLM.register(KStackHFConfig, KStackForCausalLM, exist_ok=True)
# both tokenizer classes are found by the name that tokenizer_config.json records
AutoTokenizer.register(KStackHFConfig, tokenizer_class=KStackCharTokenizer, slow_tokenizer_class=KStackByteTokenizer,
                       exist_ok=True)

__all__ = ["KStackHFConfig", "KStackModel", "KStackForCausalLM", "KStackCache", "KStackCharTokenizer",
           "KStackByteTokenizer", "hf_tokenizer", "save_hf", "transformers"]
