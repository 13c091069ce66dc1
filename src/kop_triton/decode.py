"""The fast recurrent step of a KStackLM: its blocks' prepared steps walked by one scripted module.

``KStackLM.step`` spends its time in per-op overhead: a d_model 64 model's step is a few hundred
kFLOP, so the cost is the number of tensor ops and the Python around them.  Each block owns a
prepared step (``prepared_step()`` of each block class in ``kop_triton.modules``: its parameters
folded, a few fused ops, one TorchScript interface);
``PreparedStep`` walks them: embedding (and projection), every pass of the stack, the refinement
mix, the final norm and (tied linear head) the logits, as one scripted module (``WalkStep``,
~0.05 s to script), so no Python runs between the blocks.  ROSA's automaton is advanced by the
model (``KStackLM.rosa_step``, on the CPU) and its embedding passed in.

It computes the model's step (``KStackLM.step`` through the blocks' ``step``), with the same
state (one ``KOperatorState`` per K2 layer and pass, then the RosaStream with ROSA on), so the
two paths can be mixed token by token.  There are no host synchronisations (no ``.item()``, no
data-dependent Python branches), so on CUDA the step can run asynchronously.

A ``PreparedStep`` holds copies of the weights, so it must see the live model.
``KStackLM.prepared_step()`` builds one only for a model whose modules are all of the kinds
the prepared blocks fold (no wrapped module such as a PEFT LoRA layer, no parametrization, no
forward hook anywhere, no global forward hook) and returns None otherwise: the caller then takes
the module path, which runs the modules as they are.  ``PreparedStep.valid()`` (checked by
``KStackLM.prepared_step`` at every call) compares the module tree (each child object and its
type), the hooks, and each parameter's object, version counter, data pointer, dtype and device
with those at build time; ``valid(exact=True)`` (once per ``generate`` call) also compares each
parameter's ``fingerprint`` (two wrapping 64-bit integer sums of its bits), which catches in-place
changes that bypass the version counter (``p.data.mul_(...)``) without holding a copy of the
parameters.  A step through ``KStackLM.step`` without generate sees those only after the next
version-visible change or ``generate`` call.
"""
from __future__ import annotations

import operator
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

from .modules import KOperatorState
from .ops._checks import describe
from .rosa import RosaStream

_VERSION = operator.attrgetter("_version")          # a parameter's in-place version counter
_DATA_PTR = torch.Tensor.data_ptr
_LAYOUT = operator.attrgetter("shape", "dtype", "device")
_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int32}   # element size -> integer view
_CHUNK = 1 << 20


def fingerprint(params: List[torch.Tensor]) -> torch.Tensor:
    """(len(params), 2) int64 on the first parameter's device: for each tensor, the sum of its bits
    read as integer words and the sum of word * (its index + 1), both modulo 2**64 (integer
    addition wraps, so the result does not depend on the reduction order).  Any change of a value
    changes the first sum unless other words cancel it exactly, and the second unless that also
    holds for the weighted sum.  Read in chunks of 2**20 words; nothing parameter-sized is kept."""
    rows = []
    dev = params[0].device if params else torch.device("cpu")
    for p in params:
        t = p.detach()
        words = t.contiguous().reshape(-1).view(_WORDS[t.element_size()])
        s0 = s1 = torch.zeros((), dtype=torch.int64, device=t.device)
        for i in range(0, words.numel(), _CHUNK):
            w = words[i:i + _CHUNK].to(torch.int64)
            s0 = s0 + w.sum()
            s1 = s1 + (w * torch.arange(i + 1, i + 1 + w.numel(), dtype=torch.int64, device=w.device)).sum()
        rows.append(torch.stack([s0, s1]).to(dev))
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64)


def global_hooks() -> bool:
    """A global forward (pre-)hook is registered (it would see every module call)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


class WalkStep(nn.Module):
    """The whole token step: ``forward(ids (B,), scan states, conv states, rosa_h (B, D) or None)`` ->
    (logits (B, V) for the tied linear head with E = D, else the final-normed hidden state (B, D);
    new scan states; new conv states), the states as lists in the model's order (layer within pass)."""

    __constants__ = ["n_passes", "has_proj", "has_eta", "linear_head"]

    def __init__(self, model, blocks: List[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        with torch.no_grad():
            emb = model.emb.weight.detach().clone()
            proj = model.emb_proj
            emb_proj = None if isinstance(proj, nn.Identity) else proj.weight.detach().t().contiguous()
            eta = None if model.eta_logit is None else torch.sigmoid(model.eta_logit.detach())
            norm = model.norm.scale.detach().clone()
            head_wt = None
            if model.config.head == "linear" and emb_proj is None:
                head_wt = (norm[:, None] * emb.t()).contiguous()      # (D, V): the final norm folded in
        self.n_passes, self.has_proj, self.has_eta = model.n_passes, emb_proj is not None, eta is not None
        self.linear_head = head_wt is not None
        d = norm.shape[0]
        empty = emb.new_zeros(0)
        for name, t in (("emb", emb), ("emb_proj", emb_proj), ("eta", eta), ("norm", norm), ("head_wt", head_wt),
                        ("eps", torch.full((1, 1), model.norm.eps, dtype=emb.dtype, device=emb.device)),
                        ("mean_w", torch.full((d, 1), 1.0 / d, dtype=emb.dtype, device=emb.device))):
            self.register_buffer(name, empty if t is None else t, persistent=False)

    def forward(self, ids: torch.Tensor, S: List[torch.Tensor], C: List[torch.Tensor],
                rosa: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        h = torch.embedding(self.emb, ids)
        if self.has_proj:
            h = torch.mm(h, self.emb_proj)
        S2: List[torch.Tensor] = []
        C2: List[torch.Tensor] = []
        for _ in range(self.n_passes):
            g = h
            for blk in self.blocks:
                g = blk(g, S, C, S2, C2, rosa)
            if self.has_eta:
                h = h + self.eta * (g - h)
            else:
                h = g
        t = torch.addmm(self.eps, h * h, self.mean_w).rsqrt_()
        if self.linear_head:
            return torch.mm(h, self.head_wt).mul_(t), S2, C2
        return h * t * self.norm, S2, C2


def _script(mod: nn.Module):
    try:
        with warnings.catch_warnings():       # deprecated in favour of torch.compile, whose minutes of
            warnings.simplefilter("ignore", DeprecationWarning)   # compilation the first token cannot wait for
            return torch.jit.script(mod)
    except Exception:  # pragma: no cover - TorchScript missing or refusing: the same module eagerly
        return mod


class PreparedStep:
    """One token through a KStackLM with prepared parameters (build with ``KStackLM.prepared_step()``).

    ``step(ids_t, state)`` is ``KStackLM.step``; ``step_lists(ids_t, scan, conv, stream)`` runs it on
    states held as lists with nothing checked (the transformers cache's entry)."""

    def __init__(self, model, script: bool = True):
        p0 = next(model.parameters())
        self.dtype, self.device = p0.dtype, p0.device
        self.model_ref = model
        self.n_k2 = len(model.stack.k2_blocks())
        self.n_passes = model.n_passes
        zero = model.zero_state(1)
        self.shapes = [(zero[i][0].shape[1], zero[i][1].shape[1] + 1) for i in range(self.n_k2)]   # (R, K)
        self.D = model.config.d_model
        self.rosa = model.config.rosa != "off"
        walk = WalkStep(model, model.stack.prepared_steps())
        self.walk = _script(walk) if script else walk
        self.forward = self.walk.forward                     # skips nn.Module.__call__
        self.linear_head = walk.linear_head
        self.head = model.logits_from_hidden
        self.rosa_hidden = model.rosa_hidden
        self.key = self.live_key(model)
        self.fingerprint = fingerprint(self.key[7])

    # ---- the live model ----------------------------------------------------------------
    @staticmethod
    def live_key(model):
        """What the prepared step depends on, compared cheaply (C-level maps over flat lists): every
        module's children (objects and types), every parameter (object, version, data pointer, shape,
        dtype, device), the forward hooks."""
        hook_dicts, c_dicts, c_names, c_objs, p_dicts, p_names, p_objs = [], [], [], [], [], [], []
        for m in model.modules():
            hook_dicts += [m._forward_hooks, m._forward_pre_hooks]
            for n, c in m._modules.items():
                c_dicts.append(m._modules), c_names.append(n), c_objs.append(c)
            for n, p in m._parameters.items():
                if p is not None:
                    p_dicts.append(m._parameters), p_names.append(n), p_objs.append(p)
        return (hook_dicts, c_dicts, c_names, c_objs, list(map(type, c_objs)), p_dicts, p_names, p_objs,
                list(map(_VERSION, p_objs)), list(map(_DATA_PTR, p_objs)), list(map(_LAYOUT, p_objs)))

    def valid(self, exact: bool = False) -> bool:
        """The model is as it was when this was built (``exact``: the parameters' fingerprints compared
        too, which sees edits through ``p.data`` that leave the version counter alone)."""
        hook_dicts, c_dicts, c_names, c_objs, c_types, p_dicts, p_names, p_objs, versions, ptrs, layouts = self.key
        if any(map(len, hook_dicts)) or global_hooks():
            return False
        got = list(map(dict.get, c_dicts, c_names))
        if got != c_objs or list(map(type, got)) != c_types or list(map(dict.get, p_dicts, p_names)) != p_objs:
            return False
        if (list(map(_VERSION, p_objs)) != versions or list(map(_DATA_PTR, p_objs)) != ptrs
                or list(map(_LAYOUT, p_objs)) != layouts):
            return False
        if exact:
            return torch.equal(fingerprint(p_objs), self.fingerprint)
        return True

    # ---- running ----------------------------------------------------------------------
    def check(self, state, B):
        """The K2 states of a model state (zeros when None), length and shapes checked (a few tuple
        compares); a ROSA model's RosaStream (the last entry) is left out."""
        if self.rosa and state is not None and len(state) and isinstance(state[-1], RosaStream):
            state = state[:-1]
        n = self.n_k2 * self.n_passes
        if state is None:
            return tuple(KOperatorState(torch.zeros(B, R, self.D, dtype=self.dtype, device=self.device),
                                        torch.zeros(B, K - 1, self.D, dtype=self.dtype, device=self.device))
                         for R, K in self.shapes * self.n_passes)
        if not isinstance(state, (tuple, list)) or len(state) != n:
            raise ValueError(f"state must be a tuple of {n} KOperatorState (one per K2 layer and pass), got "
                             f"{describe(state)}")
        for i, s in enumerate(state):
            R, K = self.shapes[i % self.n_k2]
            if (not isinstance(s, (tuple, list)) or len(s) != 2 or s[0].shape != (B, R, self.D)
                    or s[1].shape != (B, K - 1, self.D)):
                got = (f"{describe(s[0])} and {describe(s[1])}" if isinstance(s, (tuple, list)) and len(s) == 2
                       else describe(s))
                raise ValueError(f"state[{i}] must be a KOperatorState with scan {(B, R, self.D)} and conv "
                                 f"{(B, K - 1, self.D)}, got {got}")
        return state

    def step_lists(self, ids_t: torch.Tensor, scan: List[torch.Tensor], conv: List[torch.Tensor],
                   stream: Optional[RosaStream] = None):
        """ids_t (B,) -> (logits (B, V), new scan states, new conv states); ``stream``: a ROSA model's
        RosaStream, advanced in place.  Nothing is checked."""
        rosa = None if stream is None else self.rosa_hidden(stream.push(ids_t), self.device)
        out, scan, conv = self.forward(ids_t, scan, conv, rosa)
        return (out if self.linear_head else self.head(out)), scan, conv

    def step(self, ids_t: torch.Tensor, state) -> Tuple[torch.Tensor, tuple]:
        """ids_t (B,) -> (logits (B, V), new state), as ``KStackLM.step``."""
        stream = None
        if self.rosa:
            stream = state[-1] if state and isinstance(state[-1], RosaStream) else None
            if stream is None:
                stream = self.model_ref.new_rosa_stream(ids_t.shape[0])
        k2 = self.check(state, ids_t.shape[0])
        logits, scan, conv = self.step_lists(ids_t, [s[0] for s in k2], [s[1] for s in k2], stream)
        new = tuple(map(KOperatorState, scan, conv))
        return logits, (new + (stream,) if stream is not None else new)

    def __reduce__(self):                     # never pickled or deep-copied with the model: rebuilt on use
        return (type(None), ())
