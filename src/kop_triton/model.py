"""The K-Stack language model (SPEC section 2).

    ids (B, T) -> Embedding (V, E) -> [Linear(E, D) if E != D] -> dropout
        -> stack [K1, K2 x n_k2, K1, K0]      (optionally refined: h <- h + eta (Stack(h) - h))
        -> RMSNorm -> head: "linear" (tied to the embedding), "gelu" or "adaptive" (adaptive softmax)

Dropouts (training only): ``emb_dropout`` after the embedding, ``mlp_dropout`` after the GELU of
every MLP, ``residual_dropout`` on each K2 mixer's output, ``head_dropout`` after the GELU of the
gelu head / on the input of the adaptive head (the reference's ``--head-dropout``; none on the
tied linear head).

No positional encoding and no context limit: ``forward`` runs the parallel (chunked / fused)
form from a zero state; ``prefill`` / ``step`` / ``generate`` carry the recurrent state of
every K2 mixer, O(1) time and memory per generated token.

ROSA (``config.rosa`` "exact" or "reference", off by default; ``kop_triton.rosa``): the ROSA
ids of the input (computed on the CPU from the ids alone, -1 = no match) are shifted by +1 and
embedded, ``rosa_h = rosa_proj(rosa_emb(rosa + 1))`` with rosa_emb (V + 1, E) and rosa_proj
Linear(E, D) without bias when E != D; every selected K2 block adds ``sigmoid(rho_logit) *
rosa_h`` to its mixer output before the output projection.  ``forward`` computes ROSA from the
given ids (each row from scratch), or takes precomputed ``rosa_ids`` (the training sampler's).

Model state (for ``prefill`` / ``step``): a tuple of ``KOperatorState``, one per K2 layer and
refinement pass, pass-major (index = pass * n_k2 + layer); with ROSA on, followed by one
``RosaStream`` (the automata, advanced in place by ``prefill`` / ``step``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .modules import INIT_STD, MLP, Dropout, K0Block, K1Block, K2Block, KOperator, RMSNorm, init_kernel
from .ops.conv import MAX_KERNEL_SIZE
from .ops._checks import BACKENDS, check_int, check_token_ids, check_values_in, describe, is_int
from .rosa import MODES as ROSA_MODES
from .rosa import RosaStream, rosa_next_ids

HEADS = ("linear", "gelu", "adaptive")


@dataclass
class KStackConfig:
    """Everything needed to rebuild a KStackLM (the tokenizer is stored beside it in checkpoints)."""
    vocab_size: int
    d_model: int = field(default=64, metadata={"help": "model width D"})
    # None: E = D (no projection)
    emb_dim: Optional[int] = field(default=None, metadata={"help": "embedding width E (default: d_model)"})
    n_k2: int = field(default=6, metadata={"help": "number of K2 blocks"})
    rank: int = field(default=4, metadata={"help": "rank R of each K2 mixer (key channels)"})
    kernel_size: int = field(default=8, metadata={"help": "taps of the causal Kbase kernel"})
    # one Kbase kernel for all K2 layers
    shared_kernel: bool = field(default=True, metadata={"help": "one Kbase kernel shared by all K2 blocks"})
    gamma_min: float = field(default=0.05, metadata={"help": "lower end of the decay range"})
    gamma_max: float = field(default=1.0, metadata={"help": "upper end of the decay range"})
    alpha_cap: float = field(default=1.0, metadata={"help": "upper bound of the query scale alpha"})
    # "linear" (tied) | "gelu" | "adaptive"
    head: str = field(default="linear", metadata={"help": "output head: linear (tied), gelu or adaptive"})
    # gelu head hidden width = max(D, head_mult * D)
    head_mult: int = field(default=6, metadata={"help": "width multiplier of the gelu head"})
    # None: [V // 4, V // 2] (those inside (0, V))
    adaptive_cutoffs: Optional[List[int]] = field(default=None, metadata={"help": "comma-separated cutoffs of the adaptive head, e.g. 1024,4096"})
    adaptive_div_value: float = field(default=4.0, metadata={"help": "adaptive head: width divisor per cluster"})
    emb_dropout: float = field(default=0.0, metadata={"help": "dropout after the embedding"})
    mlp_dropout: float = field(default=0.0, metadata={"help": "dropout inside the MLPs"})
    residual_dropout: float = field(default=0.0, metadata={"help": "dropout on the K2 mixer output"})
    # gelu head: after its GELU; adaptive head: on its input
    head_dropout: float = field(default=0.0, metadata={"help": "dropout after the GELU of the gelu head / on the adaptive head's input"})
    # 0: one plain pass through the stack
    refine_steps: int = field(default=0, metadata={"help": "equilibrium refinement steps (paper option; 0 = off)"})
    backend: str = field(default="auto", metadata={"help": "op backend: auto, triton, chunked, recurrent, naive"})
    # default training / evaluation window (no model limit)
    window: int = field(default=2048, metadata={"help": "training / evaluation context length T"})
    # "off" | "exact" | "reference" (kop_triton.rosa)
    rosa: str = field(default="off", metadata={"help": "ROSA branch: off, exact (the definition) or reference (the reference implementation's automaton, as its released ROSA checkpoints)"})
    # 0-based K2 layers given the ROSA term; None: all
    rosa_layers: Optional[List[int]] = field(default=None, metadata={"help": "0-based K2 layers that get ROSA, comma-separated (default: all)"})

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_k2", "rank", "kernel_size", "head_mult", "window", "refine_steps"):
            check_int(f"KStackConfig.{name}", getattr(self, name), low=0 if name in ("n_k2", "refine_steps") else 1,
                      high=MAX_KERNEL_SIZE if name == "kernel_size" else None)
        if self.emb_dim is not None:
            check_int("KStackConfig.emb_dim (None or an int)", self.emb_dim, low=1)
        if not (0.0 < self.gamma_min < self.gamma_max <= 1.0):
            raise ValueError(f"KStackConfig needs 0 < gamma_min < gamma_max <= 1, got "
                             f"gamma_min={self.gamma_min!r}, gamma_max={self.gamma_max!r}")
        if not (isinstance(self.alpha_cap, (int, float)) and 0.0 < self.alpha_cap < math.inf):
            raise ValueError(f"KStackConfig.alpha_cap must be a positive float, got {self.alpha_cap!r}")
        if self.head not in HEADS:
            raise ValueError(f"KStackConfig.head must be one of {list(HEADS)}, got {self.head!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"KStackConfig.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        for name in ("emb_dropout", "mlp_dropout", "residual_dropout", "head_dropout"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
                raise ValueError(f"KStackConfig.{name} must be in [0, 1), got {p!r}")
        if self.head_dropout > 0 and self.head == "linear":
            raise ValueError(f"KStackConfig.head_dropout applies to the gelu and adaptive heads (the tied linear "
                             f"head has no hidden layer to drop); got head_dropout={self.head_dropout!r} with "
                             f"head='linear'")
        if not (isinstance(self.adaptive_div_value, (int, float)) and self.adaptive_div_value > 0):
            raise ValueError(f"KStackConfig.adaptive_div_value must be > 0, got {self.adaptive_div_value!r}")
        if self.rosa not in ROSA_MODES:
            raise ValueError(f"KStackConfig.rosa must be one of {list(ROSA_MODES)}, got {self.rosa!r}")
        if self.rosa_layers is not None and self.rosa == "off":
            raise ValueError(f"KStackConfig.rosa_layers={self.rosa_layers!r} given with rosa='off': the layers "
                             f"would get no ROSA term; set rosa to 'exact' or 'reference', or leave rosa_layers out")
        if self.rosa_layers is not None:
            rl = self.rosa_layers
            if (not isinstance(rl, (list, tuple)) or not rl
                    or any(not is_int(i) or not 0 <= i < self.n_k2 for i in rl)
                    or len(set(rl)) != len(rl)):
                raise ValueError(f"KStackConfig.rosa_layers must be None or a non-empty list of distinct K2 layer "
                                 f"indices in [0, n_k2={self.n_k2}), got {rl!r}")
            self.rosa_layers = sorted(rl)
        if self.head == "adaptive":
            n_tail = len(self.resolved_cutoffs())
            if int(self.d_model // (self.adaptive_div_value ** n_tail)) < 1:
                raise ValueError(f"adaptive head: the last tail cluster would have width d_model // "
                                 f"adaptive_div_value^{n_tail} = 0 (d_model={self.d_model}, "
                                 f"adaptive_div_value={self.adaptive_div_value}); use fewer cutoffs or a "
                                 f"smaller adaptive_div_value")

    @property
    def E(self) -> int:
        return self.d_model if self.emb_dim is None else self.emb_dim

    def resolved_cutoffs(self) -> List[int]:
        V = self.vocab_size
        cut = self.adaptive_cutoffs
        if cut is None:
            cut = sorted({c for c in (V // 4, V // 2) if 0 < c < V})
        cut = list(cut)
        if (not cut or any(not is_int(c) for c in cut)
                or cut != sorted(set(cut)) or cut[0] <= 0 or cut[-1] >= V):
            raise ValueError(f"adaptive cutoffs must be a non-empty increasing list of ints inside (0, "
                             f"vocab_size={V}), got {self.adaptive_cutoffs!r}")
        return cut

    def rosa_layer_set(self) -> List[int]:
        """The K2 layers (0-based) that get the ROSA term; empty when ROSA is off."""
        if self.rosa == "off":
            return []
        return list(range(self.n_k2)) if self.rosa_layers is None else list(self.rosa_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KStackConfig":
        if not isinstance(d, dict):
            raise TypeError(f"KStackConfig.from_dict needs a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown KStackConfig fields {unknown}")
        if "vocab_size" not in d:
            raise ValueError("KStackConfig needs vocab_size")
        return cls(**d)


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------


class TiedHead(nn.Module):
    """logits = [Linear(D, E)](h) @ emb.weight^T; the embedding weight is passed in (tied)."""

    def __init__(self, d: int, e: int):
        super().__init__()
        self.proj = nn.Linear(d, e, bias=False) if e != d else nn.Identity()

    def forward(self, h, emb_weight):
        return F.linear(self.proj(h), emb_weight)


class GeluHead(nn.Module):
    """RMSNorm -> Linear(D, max(D, mult * D)) -> GELU -> dropout -> Linear(-> V, no bias); untied."""

    def __init__(self, d: int, vocab_size: int, mult: int, dropout: float = 0.0):
        super().__init__()
        hidden = max(d, mult * d)
        self.norm = RMSNorm(d)
        self.up = nn.Linear(d, hidden)
        self.drop = Dropout(dropout)
        self.down = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, h):
        return self.down(self.drop(F.gelu(self.up(self.norm(h)))))


# --------------------------------------------------------------------------------------
# Stack and model
# --------------------------------------------------------------------------------------


class KStack(nn.Module):
    """[K1, K2 x n_k2, K1, K0] with an optional Kbase kernel shared by every K2 mixer (passed to
    the mixers at call time, so parameter-swapping wrappers such as FSDP2 may shard it too)."""

    def __init__(self, cfg: KStackConfig):
        super().__init__()
        D = cfg.d_model
        self.shared_kernel = nn.Parameter(init_kernel(cfg.kernel_size)) if cfg.shared_kernel else None
        blocks: List[nn.Module] = [K1Block(D, cfg.mlp_dropout)]
        rosa_layers = set(cfg.rosa_layer_set())
        for i in range(cfg.n_k2):
            mixer = KOperator(D, rank=cfg.rank, kernel_size=cfg.kernel_size, gamma_min=cfg.gamma_min,
                              gamma_max=cfg.gamma_max, alpha_cap=cfg.alpha_cap,
                              shared_kernel=self.shared_kernel, backend=cfg.backend)
            blocks.append(K2Block(D, mixer, cfg.mlp_dropout, cfg.residual_dropout, rosa=i in rosa_layers))
        blocks += [K1Block(D, cfg.mlp_dropout), K0Block(D)]
        self.blocks = nn.ModuleList(blocks)

    def k2_blocks(self) -> List[K2Block]:
        return [b for b in self.blocks if isinstance(b, K2Block)]

    gradient_checkpointing = False          # set by transformers' gradient_checkpointing_enable()
    _gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)   # (transformers sets its own)

    def forward(self, h, states=None, return_state=False, rosa_h=None, hidden_states=None, cu_seqlens=None):
        """h (B, T, D) -> (B, T, D); ``states``: one KOperatorState (or None) per K2 block;
        ``rosa_h`` (B, T, D): the ROSA embedding, used by the blocks that have a rho_logit;
        ``hidden_states``: a list to which each block's output is appended; ``cu_seqlens``:
        packed sequences in a batch of one row (each K2 mixer restarts at every boundary).
        With ``gradient_checkpointing`` (training), each block's activations are recomputed in
        the backward instead of kept."""
        new, i = [], 0
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if isinstance(blk, K2Block):
                s = None if states is None else states[i]
                args = (h, s, return_state, self.shared_kernel, rosa_h, cu_seqlens)
                out = self._gradient_checkpointing_func(blk.__call__, *args) if ckpt else blk(*args)
                if return_state:
                    h, s1 = out
                    new.append(s1)
                else:
                    h = out
                i += 1
            else:
                h = self._gradient_checkpointing_func(blk.__call__, h) if ckpt else blk(h)
            if hidden_states is not None:
                hidden_states.append(h)
        return (h, new) if return_state else h

    def step(self, h_t, states, rosa_h=None):
        """One token: h_t (B, D) -> (B, D) and the new states (``rosa_h``: (B, D) or None)."""
        new, i = [], 0
        for blk in self.blocks:
            if isinstance(blk, K2Block):
                h_t, s1 = blk.step(h_t, None if states is None else states[i], kernel=self.shared_kernel,
                                   rosa_h=rosa_h)
                new.append(s1)
                i += 1
            else:
                h_t = blk.step(h_t)
        return h_t, new

    def prepared_steps(self) -> List[nn.Module]:
        """Every block's prepared step (``K*Block.prepared_step``), in order, for ``decode.PreparedStep``."""
        return [blk.prepared_step(self.shared_kernel) if isinstance(blk, K2Block) else blk.prepared_step()
                for blk in self.blocks]


class KStackLM(nn.Module):
    """K-Stack language model.  ``model(ids)`` -> logits (B, T, V) (log-probabilities for the
    adaptive head); ``model(ids, targets)`` -> mean cross-entropy (adaptive-softmax loss)."""

    def __init__(self, config: KStackConfig):
        super().__init__()
        if not isinstance(config, KStackConfig):
            raise TypeError(f"config must be a KStackConfig, got {type(config).__name__}")
        self.config = cfg = config
        V, D, E = cfg.vocab_size, cfg.d_model, cfg.E
        self.emb = nn.Embedding(V, E)
        self.emb_proj = nn.Linear(E, D, bias=False) if E != D else nn.Identity()
        self.emb_drop = nn.Dropout(cfg.emb_dropout)
        if cfg.rosa != "off":
            self.rosa_emb = nn.Embedding(V + 1, E)           # row 0: "no match" (ROSA id -1)
            self.rosa_proj = nn.Linear(E, D, bias=False) if E != D else nn.Identity()
        else:
            self.rosa_emb = self.rosa_proj = None
        self.stack = KStack(cfg)
        self.norm = RMSNorm(D)
        if cfg.head == "linear":
            self.head = TiedHead(D, E)
        elif cfg.head == "gelu":
            self.head = GeluHead(D, V, cfg.head_mult, cfg.head_dropout)
        else:
            self.head = nn.AdaptiveLogSoftmaxWithLoss(D, V, cfg.resolved_cutoffs(),
                                                      div_value=float(cfg.adaptive_div_value), head_bias=False)
        # the adaptive head's input dropout (the gelu head holds its own; the linear head has none)
        self.head_drop = Dropout(cfg.head_dropout) if cfg.head == "adaptive" else None
        if cfg.refine_steps > 0:
            self.eta_logit = nn.Parameter(torch.tensor(math.log(0.3 / 0.7)))
        else:
            self.register_parameter("eta_logit", None)
        self._prepared = None                 # decode.PreparedStep, built by prepared_step()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # ---- configuration helpers ----------------------------------------------------------
    @property
    def n_passes(self) -> int:
        return max(1, self.config.refine_steps)

    def mixers(self) -> List[KOperator]:
        return [b.mixer for b in self.stack.k2_blocks()]

    def set_backend(self, backend: str) -> None:
        """Switch every K2 mixer (and the config) to ``backend``."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.config.backend = backend
        for m in self.mixers():
            m.backend = backend

    def set_rosa(self, mode: str) -> None:
        """Switch a ROSA model between "exact" and "reference" (the weights are the same)."""
        if mode not in ROSA_MODES[1:]:
            raise ValueError(f"rosa mode must be one of {list(ROSA_MODES[1:])}, got {mode!r}")
        if self.config.rosa == "off":
            raise ValueError(f"this model has no ROSA weights (config.rosa 'off'); cannot switch it to {mode!r}")
        self.config.rosa = mode

    def count_parameters(self) -> Dict[str, int]:
        """Trainable parameter counts, every tensor counted once (the tied head adds nothing)."""
        seen = set()

        def count(mod_or_params):
            n = 0
            for p in mod_or_params:
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
            return n

        rosa = [] if self.rosa_emb is None else list(self.rosa_emb.parameters()) + list(self.rosa_proj.parameters())
        out = {"embedding": count(list(self.emb.parameters()) + list(self.emb_proj.parameters()) + rosa),
               "stack": count(self.stack.parameters()),
               "head": count(self.head.parameters()),
               "other": count(self.parameters())}
        out["total"] = sum(out.values())
        return out

    def num_parameters(self) -> int:
        return self.count_parameters()["total"]

    # ---- parallel form ----------------------------------------------------------------
    def _embed(self, ids, check: bool = True):
        if check:
            if (not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64)
                    or ids.dim() not in (1, 2)):
                raise ValueError(f"ids must be an int32/int64 tensor of shape (B, T) or (B,), got {describe(ids)}")
            check_token_ids("ids", ids, self.config.vocab_size)
        return self.emb_drop(self.emb_proj(self.emb(ids)))

    def _rosa_hidden(self, rosa_ids, device):
        """ROSA ids (..., ) in [-1, V) -> rosa_h (..., D) on ``device``."""
        idx = rosa_ids.to(device=device, dtype=torch.long, non_blocking=True) + 1
        return self.rosa_proj(self.rosa_emb(idx))

    def compute_rosa(self, ids) -> torch.Tensor:
        """The ROSA ids of every row of ids (B, T), each from scratch (int64, on the CPU)."""
        return _rosa_ids_eager(ids, self.config.rosa, self.config.vocab_size)

    def _check_rosa_window(self, rosa_window) -> None:
        if rosa_window is not None:
            check_int("rosa_window (None or an int)", rosa_window, low=1)
            if self.config.rosa == "off":
                raise ValueError(f"rosa_window={rosa_window} given but this model has ROSA off (leave it out)")

    def _rosa_inputs(self, ids, state, return_state, rosa_ids, rosa_window):
        """(rosa_h or None, the RosaStream to carry or None) for a parallel call."""
        self._check_rosa_window(rosa_window)
        if self.config.rosa == "off":
            if rosa_ids is not None:
                raise ValueError("rosa_ids given but this model has ROSA off")
            return None, None
        stream = state[-1] if state and isinstance(state[-1], RosaStream) else None
        if rosa_ids is not None:
            if state is not None or return_state:
                raise ValueError("rosa_ids can only be given to a stateless call (training / scoring); a "
                                 "stateful one computes ROSA with its RosaStream")
            if (not isinstance(rosa_ids, torch.Tensor) or rosa_ids.shape != ids.shape
                    or rosa_ids.dtype not in (torch.int32, torch.int64)):
                raise ValueError(f"rosa_ids must be an int32/int64 tensor of the ids' shape {tuple(ids.shape)} "
                                 f"(kop_triton.rosa.rosa_next_ids computes it), got {describe(rosa_ids)}")
            check_values_in("rosa_ids", rosa_ids, -1, self.config.vocab_size,
                            f"ROSA ids in [-1, vocab_size={self.config.vocab_size}) (-1: no recurring suffix)")
        elif stream is not None or return_state:
            if stream is None:
                stream = RosaStream(ids.shape[0], self.config.vocab_size, self.config.rosa, window=rosa_window)
            elif stream.batch_size != ids.shape[0] or stream.mode != self.config.rosa:
                raise ValueError(f"the state's {stream!r} does not fit ids {tuple(ids.shape)} / rosa "
                                 f"{self.config.rosa!r}")
            rosa_ids = stream.extend(ids)
        else:
            rosa_ids = self.compute_rosa(ids)
        return self._rosa_hidden(rosa_ids, self.emb.weight.device), stream

    def _refine_mix(self, h, h_new):
        if self.eta_logit is None:
            return h_new
        return h + torch.sigmoid(self.eta_logit).to(h.dtype) * (h_new - h)

    def hidden(self, ids, state=None, return_state=False, rosa_ids=None, rosa_window=None, hidden_states=None,
               cu_seqlens=None):
        """ids (B, T) -> final-normed hidden states (B, T, D) [and the model state after T].

        ``rosa_ids`` (B, T): precomputed ROSA ids (stateless calls only); ``rosa_window``: for a
        new ROSA state, restart the automata every ``rosa_window`` tokens (None: never);
        ``hidden_states``: a list to fill with the embedding output, every block's output (every
        pass) and the final-normed output; ``cu_seqlens`` (N + 1,) int32: packed sequences in a
        batch of one row (no state; ROSA computed per sequence)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (B, T), got {describe(ids)}")
        h = self._embed(ids)                                          # (B, T, D)
        cp = self.__dict__.get("_context_parallel")     # set by kop_triton.context_parallel.enable
        if cp is not None and self.config.rosa != "off" and rosa_ids is None:
            if state is not None or return_state:
                raise ValueError("a stateful ROSA call (RosaStream state) is not supported under context "
                                 "parallelism: run it without context parallelism, or pass rosa_ids")
            rosa_ids = cp.rosa_ids(self, ids, cu_seqlens)            # ROSA of the whole sequence, this shard
        if cu_seqlens is not None:
            if state is not None or return_state or ids.shape[0] != 1:
                raise ValueError(f"cu_seqlens (packed sequences) needs one row and no state, got ids "
                                 f"{tuple(ids.shape)}, a state: {state is not None or return_state}")
            if self.config.rosa != "off" and rosa_ids is None:
                cu = cu_seqlens.tolist()
                rosa_ids = torch.cat([self.compute_rosa(ids[:, a:b]) for a, b in zip(cu[:-1], cu[1:])], 1)
        rosa_h, stream = self._rosa_inputs(ids, state, return_state, rosa_ids, rosa_window)   # (B, T, D)
        if hidden_states is not None:
            hidden_states.append(h)
        n = len(self.stack.k2_blocks())
        new = []
        for p in range(self.n_passes):
            st = None if state is None else state[p * n:(p + 1) * n]
            if return_state:
                h_new, s1 = self.stack(h, st, return_state=True, rosa_h=rosa_h, hidden_states=hidden_states)
                new += s1
            else:
                h_new = self.stack(h, st, rosa_h=rosa_h, hidden_states=hidden_states, cu_seqlens=cu_seqlens)
            h = self._refine_mix(h, h_new)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)
        if stream is not None:
            new.append(stream)
        return (h, tuple(new)) if return_state else h

    def logits_from_hidden(self, h):
        """(..., D) -> (..., V): logits, or log-probabilities for the adaptive head."""
        if self.config.head == "linear":
            return self.head(h, self.emb.weight)
        if self.config.head == "gelu":
            return self.head(h)
        lp = self.head.log_prob(self.head_drop(h).reshape(-1, h.shape[-1]))
        return lp.view(*h.shape[:-1], self.config.vocab_size)

    def loss_from_hidden(self, h, targets):
        """Mean cross-entropy of targets (B, T) given hidden states (B, T, D)."""
        if (not isinstance(targets, torch.Tensor) or targets.shape != h.shape[:-1]
                or targets.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"targets must be an int32/int64 tensor of shape {tuple(h.shape[:-1])} (the ids' "
                             f"shape), got {describe(targets)}")
        V = self.config.vocab_size
        if self.config.head == "adaptive":
            check_values_in("targets", targets, 0, V, f"token ids in [0, vocab_size={V}) (the adaptive head has no "
                                                      f"ignore index)")
        else:
            check_values_in("targets", targets, 0, V, f"token ids in [0, vocab_size={V}) or {IGNORE_INDEX} (ignored)",
                            ignore=IGNORE_INDEX)
            if targets.numel():
                msg = (f"targets: every target is {IGNORE_INDEX} (ignored), so the mean loss is 0/0; give at least "
                       f"one scored target or skip this batch")
                try:   # a ValueError on the CPU, a device-side assert elsewhere (no host sync; compiles)
                    torch._assert_async((targets != IGNORE_INDEX).any(), msg)
                except RuntimeError:
                    raise ValueError(msg) from None
        if self.config.head == "adaptive":
            return self.head(self.head_drop(h).reshape(-1, h.shape[-1]), targets.reshape(-1)).loss
        logits = self.logits_from_hidden(h)
        if logits.dtype in (torch.float16, torch.bfloat16):   # the softmax reduction in float32
            logits = logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def forward(self, ids, targets=None, rosa_ids=None):
        """ids (B, T) -> logits (B, T, V); with targets (B, T) -> the mean cross-entropy (scalar).
        ``rosa_ids``: the ROSA ids of ``ids`` when precomputed (else computed here, on the CPU)."""
        h = self.hidden(ids, rosa_ids=rosa_ids)
        return self.logits_from_hidden(h) if targets is None else self.loss_from_hidden(h, targets)

    # ---- recurrent form ---------------------------------------------------------------
    def prefill(self, ids, state=None, rosa_window=None):
        """Run a prompt (B, T) in parallel form; returns (logits of the last position (B, V), state).
        ``rosa_window``: see ``hidden`` (used when the state is new)."""
        h, new = self.hidden(ids, state=state, return_state=True, rosa_window=rosa_window)
        return self.logits_from_hidden(h[:, -1]), new

    def step(self, ids_t, state=None):
        """One token per sequence: ids_t (B,) -> (logits (B, V), new state).  O(1) per token."""
        if (not isinstance(ids_t, torch.Tensor) or ids_t.dim() != 1
                or ids_t.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"ids_t must be an int32/int64 tensor of shape (B,), got {describe(ids_t)}")
        check_token_ids("ids_t", ids_t, self.config.vocab_size)
        return self._step(ids_t, state)

    def _step(self, ids_t, state):
        """``step`` without the argument checks: the prepared step when it applies, else the modules."""
        prepared = self.prepared_step()
        if prepared is not None:
            return prepared.step(ids_t, state)
        return self.module_step(ids_t, state)

    def module_step(self, ids_t, state):
        """The step through the modules as they are (autograd, hooks, wrapped modules): ids_t (B,)."""
        h = self._embed(ids_t, check=False)                           # (B, D), checked by step
        rosa_h, stream = self.rosa_step(ids_t, state)                 # (B, D) or None
        n = len(self.stack.k2_blocks())
        new = []
        for p in range(self.n_passes):
            st = None if state is None else state[p * n:(p + 1) * n]
            h_new, s1 = self.stack.step(h, st, rosa_h=rosa_h)
            new += s1
            h = self._refine_mix(h, h_new)
        if stream is not None:
            new.append(stream)
        return self.logits_from_hidden(self.norm(h)), tuple(new)

    def new_rosa_stream(self, batch_size: int, window: Optional[int] = None) -> RosaStream:
        return RosaStream(batch_size, self.config.vocab_size, self.config.rosa, window=window)

    def rosa_hidden(self, rosa_ids, device=None):
        """ROSA ids (...) in [-1, V) -> rosa_h (..., D) on ``device`` (the embedding's by default)."""
        return self._rosa_hidden(rosa_ids, self.emb.weight.device if device is None else device)

    def rosa_step(self, ids_t, state):
        """Advance the state's RosaStream by ids_t (B,): (rosa_h (B, D), stream), or (None, None)."""
        if self.config.rosa == "off":
            return None, None
        stream = state[-1] if state and isinstance(state[-1], RosaStream) else None
        if stream is None:
            stream = self.new_rosa_stream(ids_t.shape[0])
        # the automaton is on the CPU: one host copy of the new ids per step
        return self._rosa_hidden(stream.push(ids_t), self.emb.weight.device), stream

    def zero_state(self, batch_size: int):
        """The state before any token (every K2 state zeros; a new RosaStream with ROSA on)."""
        p = self.emb.weight
        dt = torch.float64 if p.dtype == torch.float64 else torch.float32
        st = tuple(m.zero_state(batch_size, device=p.device, dtype=dt) for m in self.mixers()) * self.n_passes
        return st + ((self.new_rosa_stream(batch_size),) if self.config.rosa != "off" else ())

    def is_plain(self) -> bool:
        """Every module is of a kind the blocks' prepared steps fold (exact types: a wrapper such as
        a PEFT LoRA layer, or a parametrized module, is not), no forward hook is registered on any
        of them or globally, and the parameters are all float32 or all float64."""
        from .decode import global_hooks
        dts = {p.dtype for p in self.parameters()}
        return (len(dts) == 1 and dts <= {torch.float32, torch.float64} and not global_hooks()
                and all(type(m) in _PLAIN_MODULES and not (m._forward_hooks or m._forward_pre_hooks)
                        for m in self.modules()))

    def prepared_step(self, exact: bool = False):
        """The prepared fast step (``decode.PreparedStep``) when it applies, else None (then
        ``module_step``): inference only (no autograd, eval mode, autocast off), float32 / float64
        weights of one dtype, every module one the blocks fold (no wrapped module, no forward hook).
        Rebuilt when the model changes (``PreparedStep.valid``; ``exact``: also compare the
        parameter fingerprints (``decode.fingerprint``), once per ``generate`` call)."""
        if torch.is_grad_enabled() or self.training:
            return None
        from .decode import PreparedStep
        prep = self.__dict__.get("_prepared")          # None before the first call (or after unpickling)
        if prep is None or not prep.valid(exact):
            self._prepared = prep = None
            if not self.is_plain():
                return None
            prep = self._prepared = PreparedStep(self)
        if torch.is_autocast_enabled(prep.device.type):
            return None
        return prep

    @torch.no_grad()
    def generate(self, ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 rosa_window: Optional[int] = None):
        """Sample ``max_new_tokens`` continuations of ``ids`` (B, T) or (T,) with the recurrent state.

        The prompt is prefilled once; each new token then costs one ``step`` (no window
        recomputation, no context limit).  temperature 0 means greedy.  Returns (B, T + new)
        (or (T + new,) for a 1-D prompt).  With ROSA on, ``rosa_window`` W restarts the automata
        every W tokens (the reference's per-window ROSA); None runs them over the whole history.
        """
        check_int("max_new_tokens", max_new_tokens, low=0)
        if not (isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
        if top_k is not None:
            check_int("top_k (None or an int)", top_k, low=1)
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
        squeeze = isinstance(ids, torch.Tensor) and ids.dim() == 1
        if squeeze:
            ids = ids[None]
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 1
                or ids.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"ids must be a non-empty int32/int64 prompt of shape (B, T) or (T,), got {describe(ids)}")
        check_token_ids("ids", ids, self.config.vocab_size)   # these two also when max_new_tokens = 0
        self._check_rosa_window(rosa_window)
        was_training = self.training
        self.eval()
        try:
            out = [ids]
            if max_new_tokens > 0:
                logits, state = self.prefill(ids, rosa_window=rosa_window)
                prepared = self.prepared_step(exact=True)            # checked once for this call
                step = self.module_step if prepared is None else prepared.step
                for i in range(max_new_tokens):
                    nxt = sample_next(logits, temperature, top_k, top_p, generator)   # (B,)
                    out.append(nxt[:, None])
                    if i + 1 < max_new_tokens:
                        logits, state = step(nxt, state)
        finally:
            self.train(was_training)
        res = torch.cat(out, dim=1)
        return res[0] if squeeze else res


IGNORE_INDEX = -100     # a target of this value is not scored (torch's cross_entropy default)


_PLAIN_MODULES = (KStackLM, KStack, TiedHead, GeluHead, K1Block, K2Block, K0Block, KOperator, RMSNorm, MLP, Dropout,
                  nn.Linear, nn.Embedding, nn.Identity, nn.Dropout, nn.ModuleList, nn.Sequential,
                  nn.AdaptiveLogSoftmaxWithLoss)


@torch.compiler.disable
def _rosa_ids_eager(ids, mode, vocab_size):
    # the automaton is C code on the CPU: outside any compiled graph
    return rosa_next_ids(ids, mode, vocab_size=vocab_size)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Sample one id per row of logits (B, V); temperature 0 = argmax."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p          # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
