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
  ``KOperatorState`` per K2 layer and pass, then ROSA's ``RosaStream`` for a ROSA model) inside a
  ``transformers`` ``Cache``; ``generate()`` prefills the prompt once through the parallel form
  (or in ``prefill_chunk_size`` chunks) and then steps the state, one step per token: inside
  ``generate`` the forward sends each token step straight to the model's prepared step
  (``decode.PreparedStep.step_lists``: one scripted module, checked once per call against the
  live model; a LoRA-wrapped or hooked model takes the module path instead), and the attention
  mask and position ids stop growing once the state holds the prompt.  A returned cache
  continues: ``generate(sequences + more, past_key_values=cache)`` runs only the tokens it has
  not seen.  Transformers' own loop runs as is (logits processors, stopping criteria,
  streamers), except that the sequence it appends each token to grows in place (``_GrowingIds``:
  its ``torch.cat`` writes into spare columns instead of copying the whole sequence per token),
  so a token costs the same at 100k context as at 2k.
  Beam search reorders the states (not ROSA's automata: refused); strategies that crop the
  cache (assisted / prompt-lookup decoding) or need hidden states of past tokens (contrastive
  search, DoLa) fail at once with a ``ValueError`` naming the strategy.
- Left padding: with an ``attention_mask`` the rows are run on their unpadded tokens only
  (grouped by length), so padded positions never enter the state.
- Training: ``labels`` (shifted inside) or ``shift_labels``; ``num_items_in_batch`` (``Trainer``
  with gradient accumulation) divides the summed loss; packed sequences (``position_ids``
  restarting or ``cu_seq_lens_q``, as ``DataCollatorWithFlattening`` makes them) reach every K2
  mixer as ``cu_seqlens``; ``gradient_checkpointing_enable()`` recomputes each block.
- ``KStackCharTokenizer`` / ``KStackByteTokenizer``: the char and byte tokenizers of
  ``kop_triton.tokenizers`` as ``transformers`` tokenizers, saved beside the model.
- ``save_hf(directory, model, tokenizer)`` writes a directory that ``from_pretrained`` and
  ``pipeline`` read; ``python -m kop_triton.convert ... --format hf`` writes one from a reference
  checkpoint.

Tested with transformers 5.17.0 and 5.23.0 (the range in setup.py's ``hf`` extra: >= 5.17, < 5.24).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
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
from .rosa import RosaStream
from .ops._checks import describe, is_int
from .tokenizers import ByteTokenizer, CharTokenizer

MODEL_TYPE = "kstack"
_FIELDS = [f.name for f in dataclasses.fields(KStackConfig)]


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def _kstack_fields() -> dict:
    """Every ``KStackConfig`` field as class-body annotations and defaults (``vocab_size`` defaults
    to 256): the dataclass is the one definition of the model's configuration."""
    hints = typing.get_type_hints(KStackConfig)
    body = {"__annotations__": {}}
    for f in dataclasses.fields(KStackConfig):
        body["__annotations__"][f.name] = hints[f.name]
        body[f.name] = 256 if f.name == "vocab_size" else f.default
    return body


@strict(accept_kwargs=True)
class KStackHFConfig(PreTrainedConfig):
    """Every ``KStackConfig`` field (same names, types and defaults, taken from the dataclass;
    ``vocab_size`` defaults to 256), plus transformers' ``use_cache`` and ``tie_word_embeddings``."""

    vars().update(_kstack_fields())        # the class body's namespace: before the dataclass machinery reads it
    model_type = MODEL_TYPE
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
    if isinstance(state, RosaStream):
        raise ValueError("this operation reorders or merges the rows of the cache, and ROSA's automata (the "
                         "RosaStream in a ROSA model's state) cannot be split by row: use num_beams=1 and no "
                         "padding with a ROSA model's cache, or generate(..., use_cache=False)")
    raise TypeError(f"model state holds an unsupported {type(state).__name__}")


def _leaves(state) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    _map_state(state, lambda t: out.append(t) or t)
    return out


def _rebuild(state, leaves):
    it = iter(leaves)
    return _map_state(state, lambda _t: next(it))


CHECKSUM_FILE = "kstack_weights.sha256.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksums(directory, subfolder: str = "") -> bool:
    """Check the weights files of a local model directory against its ``kstack_weights.sha256.json``;
    False when there is nothing to check (not a local directory, or no checksum file)."""
    if not isinstance(directory, (str, os.PathLike)):
        return False
    d = os.path.join(os.fspath(directory), subfolder)
    path = os.path.join(d, CHECKSUM_FILE)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        sums = json.load(f).get("sha256", {})
    for name, want in sums.items():
        fp = os.path.join(d, name)
        if not os.path.isfile(fp):
            raise ValueError(f"{fp} is listed in {path} but missing: the model directory is incomplete")
        got = _sha256(fp)
        if got != want:
            raise ValueError(f"{fp} is corrupted: its SHA-256 is {got}, {CHECKSUM_FILE} records {want}; "
                             f"copy or convert the model again")
    return True


def _split_stream(state):
    """(the K2 states, the RosaStream or None) of a model state."""
    if state and isinstance(state[-1], RosaStream):
        return tuple(state[:-1]), state[-1]
    return tuple(state), None


class KStackCache(Cache):
    """The recurrent state of a ``KStackForCausalLM`` for ``generate()``.

    ``state`` is what ``KStackLM.prefill`` / ``step`` return (every tensor batch-first; a ROSA
    model's RosaStream last); ``seen_tokens`` counts the positions consumed.  It does not grow with
    the context.  ``generate()``'s token steps keep the state as lists (scan states, conv states,
    stream: what ``decode.PreparedStep.step_lists`` takes and returns); ``state`` builds the tuple
    from them when it is read.  A cache returned by ``generate`` continues: pass it back with the
    whole sequence (``generate(sequences + more, past_key_values=cache)``) and only the tokens it
    has not seen are run.
    """

    is_compileable = False

    def __init__(self, state=None, seen_tokens: int = 0):
        super().__init__(layers=[])
        self.state = state
        self.seen_tokens = seen_tokens
        self.prepared = None                 # the model's PreparedStep while a generate() call runs
        self._step_output = None

    @property
    def state(self):
        if self._state is None and self._lists is not None:
            scan, conv, stream = self._lists
            if any(t.is_inference() for t in scan + conv):           # made by generate's token steps: the
                with torch.inference_mode(False):                     # caller gets ordinary tensors
                    scan, conv = [t.clone() for t in scan], [t.clone() for t in conv]
                self._lists = (scan, conv, stream)
            self._state = tuple(map(KOperatorState, scan, conv)) + ((stream,) if stream is not None else ())
        return self._state

    @state.setter
    def state(self, value):
        self._state, self._lists, self._checked = value, None, None

    def _state_lists(self):
        """(scan states, conv states, RosaStream or None)."""
        if self._lists is None:
            k2, stream = _split_stream(self._state)
            self._lists = ([s[0] for s in k2], [s[1] for s in k2], stream)
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


_PLAIN = torch._C._disabled_torch_function_impl      # runs an op with no subclass handling: plain results
# generate()'s sequences of fewer ids (batch x length) than this keep transformers' copying append: each op on a
# _GrowingIds costs a Python dispatch (about 10 per token, ~40 us on the dev CPU), more than copying a short
# sequence (the copy costs ~1.3 us per 1,000 ids there: ~130 us at 100k).
GROW_IN_PLACE_FROM = 32768


class _Buffer:
    """The storage a ``_GrowingIds`` and its earlier views share; ``end``: the columns handed out."""
    __slots__ = ("buf", "end", "rows", "dtype", "device")

    def __init__(self, buf: torch.Tensor, end: int):
        self.buf, self.end, self.rows, self.dtype, self.device = buf, end, buf.shape[0], buf.dtype, buf.device


class _GrowingIds(torch.Tensor):
    """The sequence (B, T) inside transformers' decoding loop, which appends each token with
    ``input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)``: a copy of the whole
    sequence per token (at 100k context it cost more than the model's step).  Here that ``cat``
    writes the new columns into spare capacity of one buffer (doubled when full) and returns a
    longer view of it: O(new tokens), not O(T).  Columns a view holds are never written again,
    so every earlier view (a logits processor may keep one) keeps its values.  Every other op
    runs on the plain tensor and returns plain tensors."""

    @staticmethod
    def wrap(ids: torch.Tensor, spare: int) -> "_GrowingIds":
        B, T = ids.shape
        buf = ids.new_empty(B, T + max(spare, 16))
        buf[:, :T] = ids
        out = buf.narrow(1, 0, T).as_subclass(_GrowingIds)
        out._g, out._n = _Buffer(buf, T), T
        return out

    # transformers' loop reads shape and device 4 times each per token: Python properties answer
    # without the per-op __torch_function__ dispatch (the rest of the subclass's cost per token)
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._g.rows, self._n))

    @property
    def device(self) -> torch.device:
        return self._g.device

    def plain(self) -> torch.Tensor:
        """A contiguous ordinary tensor holding these values (not aliasing the buffer)."""
        return self._g.buf.narrow(1, 0, self._n).clone(memory_format=torch.contiguous_format)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.cat:
            out = _GrowingIds._append(args, kwargs)
            if out is not None:
                return out
        return _PLAIN(func, types, args, kwargs or {})

    @staticmethod
    def _append(args, kwargs):
        """``torch.cat([self, new], dim=-1 or 1)`` in place when self is the newest view, else None."""
        dim = kwargs.get("dim", 0) if kwargs else (args[1] if len(args) == 2 else 0)
        if dim not in (-1, 1) or (kwargs and kwargs.keys() != {"dim"}) or len(args) > 2:
            return None
        parts = args[0]
        if type(parts) not in (list, tuple) or len(parts) != 2:
            return None
        ids, new = parts
        if type(ids) is not _GrowingIds or type(new) is not torch.Tensor:
            return None
        g, n = ids._g, ids._n
        shape = new.shape
        if (n != g.end or len(shape) != 2 or shape[0] != g.rows or new.dtype != g.dtype
                or new.device != g.device):
            return None                                   # not the loop's append: cat decides (and raises)
        k = shape[1]
        if n + k > g.buf.shape[1]:                        # full: a new buffer twice as wide
            buf = g.buf.new_empty(g.rows, 2 * (n + k))
            buf.narrow(1, 0, n).copy_(g.buf.narrow(1, 0, n))
            g = _Buffer(buf, n)
        g.buf.narrow(1, n, k).copy_(new)
        g.end = n + k
        out = g.buf.narrow(1, 0, n + k).as_subclass(_GrowingIds)
        out._g, out._n = g, n + k
        return out


def _plain_sequences(result):
    """generate()'s result with its sequences as an ordinary tensor."""
    if isinstance(result, _GrowingIds):
        return result.plain()
    if isinstance(getattr(result, "sequences", None), _GrowingIds):
        result.sequences = result.sequences.plain()
    return result


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

# generate() options of the strategies a recurrent state cannot serve, with their names
_UNSUPPORTED = (("penalty_alpha", "contrastive search"), ("dola_layers", "DoLa decoding"),
                ("num_beam_groups", "group beam search"), ("constraints", "constrained beam search"),
                ("force_words_ids", "constrained beam search"), ("assistant_model", "assisted generation"),
                ("prompt_lookup_num_tokens", "prompt-lookup decoding"), ("assistant_early_exit", "early-exit "
                                                                         "assisted generation"))


def _check_mask_values(mask, name="attention_mask"):
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{name} must be a (B, T) tensor of 0s and 1s, got {describe(mask)}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        bad = sorted(set(mask[(mask != 0) & (mask != 1)].tolist()))[:5]
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (token), got the values {bad}")


def _packing(input_ids, position_ids, cu_seq_lens_q):
    """cu_seqlens (N + 1,) int32 for packed sequences in a batch of one row, or None (no packing)."""
    B, T = input_ids.shape
    if cu_seq_lens_q is not None:
        cu = cu_seq_lens_q
        if (not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point
                or B != 1 or int(cu[0]) != 0 or int(cu[-1]) != T or bool((cu[1:] < cu[:-1]).any())):
            raise ValueError(f"cu_seq_lens_q must be a 1-D int tensor of sequence starts 0 = c_0 <= ... <= c_N = T "
                             f"(T={T}) for packed sequences in a batch of one row (B={B}), got "
                             f"{describe(cu)}{'' if not isinstance(cu, torch.Tensor) else ' ' + str(cu.tolist()[:8])}")
        return cu.to(device=input_ids.device, dtype=torch.int32)
    if position_ids is None:
        return None
    pos = position_ids
    if not isinstance(pos, torch.Tensor) or pos.dim() not in (1, 2) or pos.shape[-1] != T:
        raise ValueError(f"position_ids must be a (B, T) int tensor, got {describe(pos)} for input_ids "
                         f"{tuple(input_ids.shape)}")
    pos = pos.reshape(-1, T)
    starts = pos[:, 1:] != pos[:, :-1] + 1                             # (B', T - 1): a new sequence starts
    if not bool(starts.any()):
        return None                                                   # consecutive positions: one sequence per row
    if B != 1 or pos.shape[0] != 1:
        raise ValueError(f"position_ids restart inside a row (packed sequences), which needs a batch of one row; "
                         f"got input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)}")
    idx = torch.nonzero(starts[0])[:, 0] + 1
    return torch.cat([idx.new_zeros(1), idx, idx.new_full((1,), T)]).to(device=input_ids.device, dtype=torch.int32)


class KStackPreTrainedModel(PreTrainedModel):
    config_class = KStackHFConfig
    base_model_prefix = "kstack"           # no such attribute: KStackModel and KStackForCausalLM share key names
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
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

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """As ``PreTrainedModel``'s; the inner ``KStackLM``'s config follows (ids up to the new size are
        accepted).  The adaptive head and ROSA's embedding (V + 1 rows) are not resized: refused."""
        cfg = self.model.config
        if cfg.head == "adaptive" or cfg.rosa != "off":
            raise ValueError(f"resize_token_embeddings supports the linear and gelu heads without ROSA; this model "
                             f"has head={cfg.head!r}, rosa={cfg.rosa!r}")
        out = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        cfg.vocab_size = self.config.vocab_size = self.model.emb.num_embeddings
        return out

    # ---- weights checksum ------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """As ``PreTrainedModel``'s, then the SHA-256 of every weights file written beside them
        (``kstack_weights.sha256.json``), which ``from_pretrained`` verifies."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            sums = {name: _sha256(os.path.join(save_directory, name)) for name in sorted(os.listdir(save_directory))
                    if name.endswith(_WEIGHT_SUFFIXES)}
            tmp = os.path.join(save_directory, CHECKSUM_FILE + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"sha256": sums}, f, indent=1, sort_keys=True)
            os.replace(tmp, os.path.join(save_directory, CHECKSUM_FILE))
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As ``PreTrainedModel``'s; a local directory's weights files are first checked against the
        SHA-256 sums ``save_pretrained`` wrote (a directory without that file loads unchecked)."""
        verify_checksums(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

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
    def _check_inputs(self, input_ids, inputs_embeds, output_attentions=None):
        if inputs_embeds is not None:
            raise ValueError("KStack models take input_ids, not inputs_embeds")
        if output_attentions:
            raise ValueError("output_attentions=True: KStack models have no attention (a recurrent state instead); "
                             "use output_hidden_states=True for the blocks' outputs")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be a non-empty (B, T) int tensor, got {describe(input_ids)}")

    def _advance(self, ids, mask, state, want_state, collect=None, cu_seqlens=None):
        """Run ids (B, T) from ``state`` (None: zeros) -> (hidden (B, T, D), state or None).  ``mask``
        (B, T) or None: a row's zeros must come first (left padding); its padded positions never
        enter the state (rows grouped by length) and their hidden states are zeros."""
        lm = self.model
        B, T = ids.shape
        if mask is not None:
            _check_mask_values(mask)
            m = mask.to(torch.bool)
            lengths = m.sum(1)                                        # (B,)
            left_pad = torch.arange(T, device=m.device)[None, :] >= (T - lengths)[:, None]
            if not torch.equal(m, left_pad):
                raise ValueError("attention_mask must be left padding (each row: zeros, then ones); KStack models "
                                 "support no other masks: padded positions must not enter the recurrent state")
            if bool((lengths == T).all()):
                mask = None
        if mask is None:
            if want_state or state is not None:
                return lm.hidden(ids, state=state, return_state=True, hidden_states=collect, cu_seqlens=cu_seqlens)
            return lm.hidden(ids, hidden_states=collect, cu_seqlens=cu_seqlens), None
        if collect is not None or cu_seqlens is not None:
            raise ValueError("output_hidden_states / packed sequences with a padding attention_mask are not supported: "
                             "run the rows unpadded")
        if state is None and not want_state and bool((lengths == 0).any()):
            raise ValueError("attention_mask has a row of zeros only (an empty prompt)")
        h = None
        groups = []
        for L in sorted(set(lengths.tolist())):
            rows = (lengths == L).nonzero()[:, 0]
            st = None if state is None else _map_state(state, lambda t: t[rows])
            if L == 0:
                sr = lm.zero_state(len(rows)) if st is None else st
                groups.append((rows, sr))
                continue
            if want_state or st is not None:
                hr, sr = lm.hidden(ids[rows, T - L:], state=st, return_state=True)
            else:
                hr, sr = lm.hidden(ids[rows, T - L:]), None
            if h is None:
                h = hr.new_zeros(B, T, hr.shape[-1])
            h[rows, T - L:] = hr
            groups.append((rows, sr))
        if h is None:
            raise ValueError("attention_mask has no token in any row (all zeros): nothing to run")
        if not want_state:
            return h, None
        template = groups[-1][1]
        out = [t.new_empty((B,) + tuple(t.shape[1:])) for t in _leaves(template)]
        for rows, sr in groups:
            for o, t in zip(out, _leaves(sr)):
                o[rows] = t.to(o.dtype)
        return h, _rebuild(template, out)

    def _run(self, input_ids, attention_mask, past_key_values, use_cache, inputs_embeds, want_hidden=False,
             output_attentions=None, collect=None, cu_seqlens=None):
        """-> (hidden or None, last-position logits or None, cache or None)."""
        self._check_inputs(input_ids, inputs_embeds, output_attentions)
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        cache = past_key_values
        if cache is not None and not isinstance(cache, KStackCache):
            raise TypeError(f"past_key_values must be a KStackCache (the recurrent state), got {type(cache).__name__}")
        if cu_seqlens is not None and (use_cache or cache is not None):
            if cache is not None and cache.has_previous_state():
                raise ValueError("packed sequences (position_ids restarting / cu_seq_lens_q) start from no state: "
                                 "do not pass past_key_values with them")
            use_cache = False
        state = None if cache is None else cache.state
        T = input_ids.shape[1]
        mask = attention_mask
        if mask is not None and state is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] not in (T, cache.seen_tokens + T):
                raise ValueError(f"attention_mask must cover the new tokens ({T}) or the whole sequence "
                                 f"({cache.seen_tokens} seen + {T}), got {describe(mask)}")
            mask = mask[:, -T:]
        elif mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{describe(mask)}")
        h = step_logits = None
        if (state is not None and T == 1 and not want_hidden and collect is None
                and (mask is None or bool(mask.all()))):                 # one generated token: the recurrent step
            step_logits, new = self.model.step(input_ids[:, 0], state)
        else:
            h, new = self._advance(input_ids, mask, state, use_cache, collect, cu_seqlens)
        if use_cache:
            cache = KStackCache() if cache is None else cache
            cache.state, cache.seen_tokens = new, cache.seen_tokens + T
        else:
            cache = None
        return h, step_logits, cache


def _hidden_states_out(collect):
    return None if collect is None else tuple(collect)


class KStackModel(KStackPreTrainedModel):
    """The K-Stack without its head: ``last_hidden_state`` is the final-normed hidden state (B, T, D)."""

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None,
                inputs_embeds=None, return_dict=None, output_hidden_states=None, output_attentions=None,
                position_ids=None, cu_seq_lens_q=None, **kwargs):
        collect = [] if output_hidden_states else None
        cu = (_packing(input_ids, position_ids, cu_seq_lens_q)
              if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None)
        h, _, cache = self._run(input_ids, attention_mask, past_key_values, use_cache, inputs_embeds,
                                want_hidden=True, output_attentions=output_attentions, collect=collect, cu_seqlens=cu)
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=cache,
                                       hidden_states=_hidden_states_out(collect))


class KStackForCausalLM(KStackPreTrainedModel, GenerationMixin):
    """K-Stack language model for ``transformers``: logits (B, T, V) (log-probabilities for the
    adaptive head), ``loss`` with labels (shifted inside, -100 ignored; divided by
    ``num_items_in_batch`` when given, as ``Trainer`` does with gradient accumulation), the
    recurrent state as ``past_key_values`` (a ``KStackCache``), packed sequences through
    ``position_ids`` / ``cu_seq_lens_q`` (``DataCollatorWithFlattening``)."""

    accepts_loss_kwargs = True             # forward honours num_items_in_batch (Trainer's accumulation)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                       # the forward creates its KStackCache

    def get_output_embeddings(self):
        # the linear head reads model.emb.weight (nothing separate); the gelu head's output layer
        return self.model.head.down if self.model.config.head == "gelu" else None

    def set_output_embeddings(self, value):
        if self.model.config.head != "gelu":
            raise ValueError(f"the {self.model.config.head!r} head has no separate output embedding to set")
        self.model.head.down = value

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        """The tokens the cache has not seen: ``next_sequence_length`` of them when transformers gives it
        (continuing from a returned cache, each token step), else all (a prefill chunk)."""
        if next_sequence_length is not None:
            if next_sequence_length <= 0:
                seen = past_key_values.get_seq_length() if past_key_values is not None else 0
                raise ValueError(f"past_key_values has seen {seen} tokens, but input_ids {tuple(input_ids.shape)} "
                                 f"hold no new ones: pass the whole sequence the cache continues (its tokens and "
                                 f"the new ones)")
            input_ids = input_ids[:, -next_sequence_length:]
        T = input_ids.shape[1]
        if attention_mask is not None and past_key_values is not None and past_key_values.has_previous_state():
            seen = past_key_values.get_seq_length()
            # the mask stops growing once the state holds the prompt (generated tokens are never padding)
            attention_mask = attention_mask[:, -T:] if attention_mask.shape[1] == seen + T else None
        out = {"input_ids": input_ids.contiguous(), "past_key_values": past_key_values,
               "attention_mask": attention_mask}
        for key in ("use_cache", "logits_to_keep", "output_hidden_states"):
            if key in kwargs:
                out[key] = kwargs[key]
        return out

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        """As ``GenerationMixin``'s, except that once the cache holds the state the attention mask and
        the position ids are no longer grown: the prompt's padding is already kept out of the state,
        and the token steps read neither (growing them costs a copy of the whole sequence per token)."""
        cache = getattr(outputs, "past_key_values", None)
        if isinstance(cache, KStackCache) and cache.has_previous_state():
            kept = {k: model_kwargs.pop(k) for k in ("attention_mask", "position_ids") if k in model_kwargs}
            model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                       num_new_tokens)
            model_kwargs.update(kept)
            return model_kwargs
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)

    def _check_generate_args(self, args, kwargs):
        cfg = kwargs.get("generation_config") or self.generation_config
        for key, name in _UNSUPPORTED:
            val = kwargs.get(key, getattr(cfg, key, None))
            if val is not None and not (key == "num_beam_groups" and val == 1):
                raise ValueError(f"{name} ({key}={val!r}) is not supported by KStack models: it needs to crop or "
                                 f"re-read a cache, and the recurrent state only moves forward")
        top_p = kwargs.get("top_p", getattr(cfg, "top_p", None))
        if top_p is not None and not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool)
                                      and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1: no nucleus filtering), got {top_p!r}")
        for key in ("max_new_tokens", "min_new_tokens", "max_length"):
            val = kwargs.get(key)
            if val is not None and not (is_int(val) and val >= 0):
                raise ValueError(f"{key} must be an int >= 0, got {val!r}")
        nb = kwargs.get("num_beams", getattr(cfg, "num_beams", 1))
        if nb is not None and not (is_int(nb) and nb >= 1):
            raise ValueError(f"num_beams must be an int >= 1, got {nb!r}")
        if (self.model.config.rosa != "off" and nb is not None and nb > 1
                and kwargs.get("use_cache", getattr(cfg, "use_cache", True)) is not False):
            raise ValueError(f"beam search (num_beams={nb}) reorders the cache's rows, and ROSA's automata (the "
                             f"RosaStream in a ROSA model's cache) cannot be split by row: pass use_cache=False "
                             f"(each step re-runs the sequence) or num_beams=1")
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            _check_mask_values(mask)
            if isinstance(ids, torch.Tensor) and ids.dim() == 2 and mask.shape != ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got "
                                 f"{describe(mask)}")
        cache = kwargs.get("past_key_values")
        if cache is not None:
            if not isinstance(cache, KStackCache):
                raise TypeError(f"past_key_values must be a KStackCache, got {type(cache).__name__}")
            if isinstance(ids, torch.Tensor) and ids.dim() == 2 and cache.has_previous_state() \
                    and cache.get_seq_length() >= ids.shape[1]:
                raise ValueError(f"past_key_values has seen {cache.get_seq_length()} tokens, but input_ids "
                                 f"{tuple(ids.shape)} hold no new ones: pass the whole sequence the cache continues "
                                 f"(its tokens and the new ones)")
        return cfg

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``; refuses the strategies a recurrent state cannot serve and bad
        arguments.  The token steps go to the model's prepared step (``decode.PreparedStep``, checked
        once here against the live model: None, i.e. the module path, for a wrapped or hooked model)."""
        self._check_generate_args(args, kwargs)
        cfg = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", getattr(cfg, "use_cache", True))
        cache = kwargs.get("past_key_values")
        if use_cache is not False and cache is None:
            cache = kwargs["past_key_values"] = KStackCache()
        prepared = None
        if cache is not None:
            with torch.no_grad():                                     # as generate runs
                prepared = self.model.prepared_step(exact=True)
            cache.prepared = prepared
        try:
            return super().generate(*args, **kwargs)
        finally:
            if cache is not None:
                cache.prepared = cache._step_output = None

    def _sample(self, input_ids, *args, **kwargs):
        """transformers' greedy / sampling loop, with ``input_ids`` growing in place (``_GrowingIds``)
        so that appending a token does not copy the whole sequence."""
        if type(input_ids) is torch.Tensor and input_ids.dim() == 2 and input_ids.numel() >= GROW_IN_PLACE_FROM:
            cfg = kwargs.get("generation_config")
            spare = getattr(cfg, "max_new_tokens", None) or 0
            input_ids = _GrowingIds.wrap(input_ids, spare + 1 if is_int(spare) else 16)
        return _plain_sequences(super()._sample(input_ids, *args, **kwargs))

    def _fast_step(self, prepared, input_ids, cache):
        """One generated token per row through the prepared step: (B, 1) -> CausalLMOutputWithPast."""
        if cache._checked is not prepared:                            # once per state handed in
            prepared.check(_split_stream(cache.state)[0], input_ids.shape[0])
            cache._checked = prepared
        scan, conv, stream = cache._state_lists()
        with torch.inference_mode():                                  # 0.2x less CPU per step than under no_grad
            logits, scan, conv = prepared.step_lists(input_ids.reshape(-1), scan, conv, stream)
        cache._state, cache._lists = None, (scan, conv, stream)
        cache.seen_tokens += 1
        out = cache._step_output                                      # one output object per generate call,
        if out is None:                                               # its logits replaced each token (the
            out = cache._step_output = CausalLMOutputWithPast(logits=logits, past_key_values=cache)   # loop
        out["logits"] = logits.unsqueeze(1)                           # keeps no output past its token)
        return out

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None, use_cache=None,
                inputs_embeds=None, return_dict=None, logits_to_keep=0, output_hidden_states=None,
                output_attentions=None, position_ids=None, cu_seq_lens_q=None, num_items_in_batch=None,
                shift_labels=None, **kwargs):
        prepared = getattr(past_key_values, "prepared", None)
        if (prepared is not None and labels is None and type(past_key_values) is KStackCache
                and not output_hidden_states and past_key_values.has_previous_state() and use_cache is not False
                and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 1
                and not torch.is_grad_enabled()):
            return self._fast_step(prepared, input_ids, past_key_values)   # inside generate: a token step
        collect = [] if output_hidden_states else None
        cu = (_packing(input_ids, position_ids, cu_seq_lens_q)
              if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None)
        h, step_logits, cache = self._run(input_ids, attention_mask, past_key_values, use_cache, inputs_embeds,
                                          output_attentions=output_attentions, collect=collect, cu_seqlens=cu)
        lm = self.model
        if step_logits is not None:
            logits = step_logits[:, None]                             # (B, 1, V)
        elif labels is None and shift_labels is None and isinstance(logits_to_keep, torch.Tensor):
            if logits_to_keep.dim() != 1 or logits_to_keep.dtype.is_floating_point:
                raise ValueError(f"logits_to_keep must be an int or a 1-D tensor of positions, got "
                                 f"{describe(logits_to_keep)}")
            logits = lm.logits_from_hidden(h[:, logits_to_keep.to(h.device)])
        elif labels is None and shift_labels is None and is_int(logits_to_keep) and logits_to_keep > 0:
            logits = lm.logits_from_hidden(h[:, -logits_to_keep:])
        else:
            logits = lm.logits_from_hidden(h)                         # (B, T, V)
        loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is None:
                if not isinstance(labels, torch.Tensor) or logits.shape[:2] != labels.shape:
                    raise ValueError(f"labels must have the shape of input_ids {tuple(logits.shape[:2])}, got "
                                     f"{describe(labels)}")
                scored, targets = logits[:, :-1], labels[:, 1:]
            else:
                if not isinstance(shift_labels, torch.Tensor) or logits.shape[:2] != shift_labels.shape:
                    raise ValueError(f"shift_labels must have the shape of input_ids {tuple(logits.shape[:2])}, got "
                                     f"{describe(shift_labels)}")
                scored, targets = logits, shift_labels
            if scored.dtype in (torch.float16, torch.bfloat16):      # the softmax reduction in float32
                scored = scored.float()
            targets = targets.reshape(-1).to(logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(scored.reshape(-1, scored.shape[-1]), targets, ignore_index=-100)
            else:
                n = num_items_in_batch
                if isinstance(n, torch.Tensor):
                    n = n.to(logits.device)
                loss = F.cross_entropy(scored.reshape(-1, scored.shape[-1]), targets, ignore_index=-100,
                                       reduction="sum") / n
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache,
                                      hidden_states=_hidden_states_out(collect))


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------


class _KStackTokenizer(PreTrainedTokenizer):
    """Shared by the char and byte tokenizers.  The eos, bos and pad tokens are an ordinary character
    of the vocabulary (newline when there is one, else the vocabulary's first character): the models
    were trained with no special token, so none is added (an added id would be outside the model's
    vocabulary).  They let ``pipeline(..., batch_size=N)`` pad (left padding, which the models keep
    out of their state) and lm-evaluation-harness's ``HFLM`` prefix and pad sequences; decoding keeps
    them (``skip_special_tokens`` has nothing to skip: they are text).  The model's generation config
    has no eos, so generate() does not stop at a newline."""

    model_input_names = ["input_ids", "attention_mask"]

    def _init_special(self, default: str, kwargs):
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("padding_side", "left")
        for key in ("eos_token", "bos_token", "pad_token"):
            kwargs.setdefault(key, default)
        return kwargs

    def _tokenize(self, text, **kwargs):
        if not isinstance(text, str):
            raise TypeError(f"{type(self).__name__} encodes str, got {type(text).__name__} {text!r:.60}")
        return self._split(text)

    def _check_id(self, index):
        if not (isinstance(index, int) and 0 <= index < self.vocab_size):
            raise ValueError(f"token id {index!r} is outside this tokenizer's vocabulary [0, {self.vocab_size})")

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        for i in ids:
            self._check_id(int(i))
        return super()._decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                               **kwargs)


class KStackCharTokenizer(_KStackTokenizer):
    """Char vocabulary (``kop_triton.tokenizers.CharTokenizer``): id = position in the sorted chars.
    A character outside the vocabulary is an error, as in kop-triton's own tokenizer."""

    vocab_files_names = {"vocab_file": "kstack_chars.json"}

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
        super().__init__(**self._init_special("\n" if "\n" in chars else chars[0], kwargs))

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def get_vocab(self):
        vocab = {c: i for i, c in enumerate(self._tok.chars)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _split(self, text):
        self._tok.encode(text)                                        # raises on a character outside the vocabulary
        return list(text)

    def _convert_token_to_id(self, token):
        return self._tok.encode(token)[0]

    def _convert_id_to_token(self, index):
        self._check_id(index)
        return self._tok.chars[index]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "kstack_chars.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"chars": self._tok.chars}, f, ensure_ascii=False)
        return (path,)


class KStackByteTokenizer(_KStackTokenizer):
    """UTF-8 bytes, ids 0..255 (``kop_triton.tokenizers.ByteTokenizer``); tokens are chr(byte)."""

    def __init__(self, **kwargs):
        super().__init__(**self._init_special("\n", kwargs))

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self):
        vocab = {chr(i): i for i in range(256)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _split(self, text):
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token):
        if len(token) != 1 or ord(token) > 255:
            raise ValueError(f"{token!r} is not a byte token")
        return ord(token)

    def _convert_id_to_token(self, index):
        self._check_id(index)
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
# Each tokenizer class registered with its own name (AutoTokenizer finds the one tokenizer_config.json
# records); the char tokenizer, registered last, is the kstack config's default.
for _tok_cls in (KStackByteTokenizer, KStackCharTokenizer):
    AutoTokenizer.register(KStackHFConfig, tokenizer_class=_tok_cls, exist_ok=True)

__all__ = ["verify_checksums", "CHECKSUM_FILE", "KStackHFConfig", "KStackModel", "KStackForCausalLM", "KStackCache", "KStackCharTokenizer",
           "KStackByteTokenizer", "hf_tokenizer", "save_hf", "transformers", "RosaStream"]
