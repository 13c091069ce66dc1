"""Import a v2 checkpoint of the reference implementation (AileenKoneko/K-language-model).

    python -m kop_triton.convert SRC.pt OUT_DIR --tokenizer char|byte [--text FILE]
                                 --gamma-min G --alpha-cap A [--gamma-max 1.0] [--window 2048]
                                 [--rosa exact|reference|off] [--format kop|hf]

The source is a torch zip whose ``model`` entry is the state dict (keys possibly prefixed
``_orig_mod.``); it stores neither the model config nor the tokenizer.  Everything the tensor
shapes determine is inferred (vocab, widths, n_k2, rank, kernel size and sharing, head type
and sizes); the decay range and alpha cap change the model without changing any shape, so they
are required flags, as is the tokenizer (char: the sorted set of characters of ``--text``,
which must be the whole training text).

Loading is safe: ``torch.load(weights_only=True)`` with an explicit allow-list of the few numpy
globals the source's ``rng_state`` needs; nothing else is unpickled.

ROSA: every reference checkpoint holds ``rosa_emb`` (and ``rosa_to_model`` when E != D) and a
``rho_logit`` per K2 layer, trained or not.  The weights count as trained when a layer's
``rho_logit`` has moved from its init logit(0.1) (it gets no gradient with ROSA off); then
``--rosa`` is required, since the file does not say how ROSA was computed: ``reference`` (the
reference implementation's automaton, what its released checkpoints were trained and scored
with), ``exact`` (the definition) or ``off`` (drop the ROSA weights: a different model).  The
layers whose ``rho_logit`` moved are the ones that get the ROSA term.  Untrained ROSA weights
are dropped (``--rosa exact|reference`` is then an error).
"""
from __future__ import annotations

if __name__ == "__main__":   # python -m kop_triton.convert: run as the console script does, before the slow
    import sys               # imports, so that a Ctrl-C even during them ends with one line, exit 130
    from kop_triton.cli import run_tool
    sys.exit(run_tool("kop-convert", "kop_triton.convert"))

import re
import sys
from pathlib import Path
from typing import Dict, Tuple

import torch

from .checkpoint import CheckpointError, check_destination, check_state_dict, save_checkpoint
from .cli import ArgumentParser, fail
from .data import read_text
from .model import KStackConfig, KStackLM
from .modules import ROSA_RHO_INIT
from .tokenizers import ByteTokenizer, CharTokenizer


PROG = "kop-convert"


class ConvertError(Exception):
    """A source checkpoint that cannot be converted (with the reason)."""


_PREFIXES = ("_orig_mod.", "module.")
_IGNORED = re.compile(r"^(eta_logit$|k_stack\.layers\.\d+\.(causal_mask|decay_diff)$)")
_ROSA_KEYS = re.compile(r"^(rosa_emb\.|rosa_to_model\.|k_stack\.layers\.\d+\.rho_logit$)")


def _numpy_allow_list():
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype]
    names = ("UInt8DType", "UInt32DType", "UInt64DType", "Int32DType", "Int64DType", "Float32DType",
             "Float64DType", "BoolDType")
    allowed += [getattr(np.dtypes, n) for n in names if hasattr(getattr(np, "dtypes", None), n)]
    return allowed


def _short_reason(e: Exception) -> str:
    """The informative line of a torch.load failure (its messages run to many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error:" in ln:
            return "refused by the weights-only unpickler: " + ln.split("WeightsUnpickler error:", 1)[1].strip()
    for ln in lines:
        if "Unsupported global" in ln or "not an allowed global" in ln:
            return "refused by the weights-only unpickler: " + ln
    return lines[0] if lines else type(e).__name__


def load_reference_state_dict(path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Safely load a reference checkpoint: (state dict without prefixes, {step, best_ppl} info)."""
    path = Path(path)
    if path.is_dir():
        hint = (" (it is a kop-triton checkpoint already: load it, no conversion needed)"
                if (path / "config.json").is_file() else "")
        raise ConvertError(f"SRC {str(path)!r} is a directory{hint}; SRC is the reference implementation's .pt "
                           f"checkpoint file")
    if not path.is_file():
        raise ConvertError(f"SRC {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{" and not head.startswith(b"PK")):
        raise ConvertError(f"SRC {str(path)!r} is a safetensors file (a kop-triton or transformers checkpoint's "
                           f"weights: load its directory directly); SRC is the reference implementation's .pt file")
    allowed = _numpy_allow_list()
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:  # torch 2.4
            torch.serialization.add_safe_globals(allowed)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupted zip, truncated file, disallowed global: all refused
        import zipfile
        reason = ("not a complete torch zip archive (truncated or corrupted)" if not zipfile.is_zipfile(path)
                  else _short_reason(e))
        raise ConvertError(f"cannot load {str(path)!r} safely: {reason}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, info = obj["model"], {k: obj[k] for k in ("step", "best_ppl") if isinstance(obj.get(k), (int, float))}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, info = obj, {}
    else:
        raise ConvertError(f"{str(path)!r} holds no model state dict (expected a 'model' entry)")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ConvertError(f"{str(path)!r}: model entry {k!r} is not a tensor")
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    if not any(k.startswith("k_stack.layers.") for k in out):
        raise ConvertError(f"{str(path)!r} holds no K-Stack layers (keys k_stack.layers.N.*; it has "
                           f"{sorted(out)[:4]}{' ...' if len(out) > 4 else ''}): not a reference K-language-model v2 "
                           f"checkpoint")
    return out, info


def _layer_kinds(state) -> Dict[int, str]:
    layers: Dict[int, set] = {}
    for k in state:
        m = re.match(r"^k_stack\.layers\.(\d+)\.(.+)$", k)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(m.group(2))
    kinds = {}
    for i, names in layers.items():
        if "decay_logit" in names:
            kinds[i] = "K2"
        elif "feature_mix.weight" in names:
            kinds[i] = "K1"
        elif "gain" in names:
            kinds[i] = "K0"
        else:
            raise ConvertError(f"k_stack.layers.{i} is neither a K1, K2 nor K0 block (keys {sorted(names)[:6]})")
    return kinds


def _get(state, key):
    if key not in state:
        raise ConvertError(f"source state dict lacks {key!r}")
    return state[key]


def trained_rosa_layers(state):
    """0-based K2 layers whose rho_logit has moved from its init logit(0.1) (ROSA was trained)."""
    kinds = _layer_kinds(state)
    k2 = sorted(i for i, k in kinds.items() if k == "K2")
    out = []
    for j, i in enumerate(k2):
        t = state.get(f"k_stack.layers.{i}.rho_logit")
        if t is not None and abs(float(t.reshape(-1)[0]) - ROSA_RHO_INIT) > 1e-6:
            out.append(j)
    return out


def infer_config(state, *, gamma_min, gamma_max, alpha_cap, window=2048, rosa="off",
                 rosa_layers=None) -> KStackConfig:
    """The KStackConfig the tensor shapes imply, completed with the given decay range and alpha cap."""
    if any(re.match(r"^k_stack\.layers\.\d+\.k_base$", k) for k in state):
        raise ConvertError("this is a v1 checkpoint (dense (window, window) k_base); only v2 is supported")
    emb = _get(state, "emb.weight")
    V, E = emb.shape
    D = _get(state, "norm.scale").shape[0]
    kinds = _layer_kinds(state)
    n = len(kinds)
    order = [kinds.get(i) for i in range(n)]
    n_k2 = n - 3
    if n < 3 or order != ["K1"] + ["K2"] * n_k2 + ["K1", "K0"]:
        raise ConvertError(f"unexpected layer sequence {order}; expected [K1, K2 x n, K1, K0]")
    rank = _get(state, "k_stack.layers.1.u").shape[1] if n_k2 else 1
    shared = "k_stack.shared_k_base_kernel" in state
    if shared:
        ksize = state["k_stack.shared_k_base_kernel"].shape[0]
    elif n_k2:
        ksize = _get(state, "k_stack.layers.1.k_base_kernel").shape[-1]
    else:
        ksize = 8
    head_mult, cutoffs, div_value = 6, None, 4.0
    if "head.up.weight" in state or "head.1.weight" in state:
        head = "gelu"
        hidden = state.get("head.up.weight", state.get("head.1.weight")).shape[0]
        if hidden % D:
            raise ConvertError(f"gelu head width {hidden} is not a multiple of d_model {D}")
        head_mult = hidden // D
    elif "head.head.head.weight" in state:
        head = "adaptive"
        n_tail = len({m.group(1) for k in state for m in [re.match(r"^head\.head\.tail\.(\d+)\.", k)] if m})
        short = state["head.head.head.weight"].shape[0] - n_tail
        cutoffs = [short]
        for i in range(n_tail - 1):
            cutoffs.append(cutoffs[-1] + _get(state, f"head.head.tail.{i}.1.weight").shape[0])
        div_value = D / _get(state, "head.head.tail.0.0.weight").shape[0] if n_tail else 4.0
    else:
        head = "linear"
    try:
        return KStackConfig(vocab_size=V, d_model=D, emb_dim=None if E == D else E, n_k2=n_k2, rank=rank,
                            kernel_size=ksize, shared_kernel=shared, gamma_min=gamma_min, gamma_max=gamma_max,
                            alpha_cap=alpha_cap, head=head, head_mult=head_mult, adaptive_cutoffs=cutoffs,
                            adaptive_div_value=div_value, window=window, rosa=rosa, rosa_layers=rosa_layers)
    except ValueError as e:
        raise ConvertError(str(e)) from None


_K2_MAP = {"u": "mixer.u", "v": "mixer.v", "decay_logit": "mixer.decay_logit",
           "alpha_logit": "mixer.alpha_logit", "k_base_gate_logit": "mixer.gate_logit",
           "k_base_kernel": "mixer.kernel", "proj.weight": "mixer.proj.weight", "proj.bias": "mixer.proj.bias"}
_K1_MAP = {"feature_mix.weight": "mix.weight", "feature_mix.bias": "mix.bias"}
_HEAD_MAP = {"head.output_projection.weight": "head.proj.weight", "head_to_emb.weight": "head.proj.weight",
             "head.0.scale": "head.norm.scale", "head.1.weight": "head.up.weight", "head.1.bias": "head.up.bias",
             "head.3.weight": "head.down.weight"}


def convert_state_dict(state, config: KStackConfig) -> Dict[str, torch.Tensor]:
    """Rename the reference's tensors to this package's names (shapes checked by the caller)."""
    kinds = _layer_kinds(state)
    k2 = sorted(i for i, kind in kinds.items() if kind == "K2")
    rosa_layers = {k2[j] for j in config.rosa_layer_set()}
    out = {}
    for k, t in state.items():
        if _IGNORED.match(k):
            continue
        if _ROSA_KEYS.match(k):
            if config.rosa == "off":
                continue
            m = re.match(r"^k_stack\.layers\.(\d+)\.rho_logit$", k)
            if m:
                if int(m.group(1)) in rosa_layers:
                    out[f"stack.blocks.{m.group(1)}.rho_logit"] = t.reshape(())
            else:
                out[k.replace("rosa_to_model.", "rosa_proj.")] = t
            continue
        m = re.match(r"^k_stack\.layers\.(\d+)\.(.+)$", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            table = _K2_MAP if kinds[i] == "K2" else _K1_MAP if kinds[i] == "K1" else {}
            rest = table.get(rest, rest)
            if rest == "mixer.alpha_logit" and t.numel() == 1:   # older scalar alpha: one value per rank
                t = t.reshape(1).expand(config.rank)
            if rest == "mixer.gate_logit":
                t = t.reshape(())
            out[f"stack.blocks.{i}.{rest}"] = t
        elif k == "k_stack.shared_k_base_kernel":
            out["stack.shared_kernel"] = t
        elif k == "emb_to_model.weight":
            out["emb_proj.weight"] = t
        elif k in ("head.head.weight", "head.weight") and config.head == "linear":
            if not torch.equal(t, state["emb.weight"]):
                raise ConvertError(f"{k} differs from emb.weight: the linear head is not tied; cannot convert")
        elif config.head == "adaptive" and k.startswith("head.head."):
            out["head." + k[len("head.head."):]] = t
        else:
            out[_HEAD_MAP.get(k, k)] = t
    return {k: v.detach().clone().float().contiguous() for k, v in out.items()}


def resolve_rosa(state, rosa):
    """(mode, rosa_layers) for the config, from the flag and the weights (module docstring)."""
    if rosa is not None and rosa not in ("off", "exact", "reference"):
        raise ConvertError(f"--rosa must be 'exact', 'reference' or 'off', got {rosa!r}")
    trained = trained_rosa_layers(state)
    if trained and rosa is None:
        raise ConvertError(
            f"the checkpoint has trained ROSA weights (rho_logit of K2 layers {trained} moved from its init "
            f"logit(0.1)) and does not say how ROSA was computed: pass --rosa reference (the reference "
            f"implementation's automaton, which its released checkpoints were trained with), --rosa exact "
            f"(the definition) or --rosa off (drop the ROSA weights: a different model)")
    if not trained and rosa in ("exact", "reference"):
        raise ConvertError(f"--rosa {rosa}: the checkpoint's ROSA weights were never trained (every rho_logit "
                           f"is at its init logit(0.1)); convert it without --rosa (or with --rosa off)")
    if not trained or rosa == "off":
        return "off", None
    n_k2 = sum(1 for k in _layer_kinds(state).values() if k == "K2")
    return rosa, (None if len(trained) == n_k2 else trained)


def convert(src, out_dir, *, tokenizer: str, text=None, gamma_min, alpha_cap, gamma_max=1.0, window=2048,
            overwrite=False, rosa=None, format="kop"):
    """Convert ``src`` into a checkpoint directory ``out_dir``; returns (model, tokenizer).

    ``rosa``: None, "off", "exact" or "reference" (required when ROSA was trained; module docstring).
    ``format``: "kop" (this package's checkpoint) or "hf" (a transformers directory: config,
    weights and tokenizer, read by ``from_pretrained`` and ``pipeline`` after ``import kop_triton.hf``).
    """
    if format not in ("kop", "hf"):
        raise ConvertError(f"--format must be 'kop' or 'hf', got {format!r}")
    out_dir = Path(out_dir)
    check_destination(out_dir, "OUT_DIR", "hf" if format == "hf" else "kop", overwrite=overwrite)
    if tokenizer == "char":
        if text is None:
            raise ConvertError("--tokenizer char needs --text FILE (the whole training text) for its vocabulary")
        chars = read_text(text, "--text", ConvertError)
        if not chars:
            raise ConvertError(f"--text {text} is empty; give the whole training text the model was trained on")
        tok = CharTokenizer(chars)
    elif tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        raise ConvertError(f"--tokenizer must be 'char' or 'byte', got {tokenizer!r}")
    state, info = load_reference_state_dict(src)
    rosa_mode, rosa_layers = resolve_rosa(state, rosa)
    config = infer_config(state, gamma_min=gamma_min, gamma_max=gamma_max, alpha_cap=alpha_cap, window=window,
                          rosa=rosa_mode, rosa_layers=rosa_layers)
    if tok.vocab_size != config.vocab_size:
        raise ConvertError(f"the {tokenizer} tokenizer has {tok.vocab_size} tokens but the checkpoint's "
                           f"embedding has {config.vocab_size} rows" +
                           (" (is --text the text it was trained on?)" if tokenizer == "char" else ""))
    ours = convert_state_dict(state, config)
    model = KStackLM(config)
    try:
        check_state_dict(model, ours, source=str(src))
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    model.load_state_dict(ours, strict=True)
    if format == "hf":
        from .hf import save_hf
        save_hf(out_dir, model, tok, overwrite=overwrite)
        return model.eval(), tok
    meta = {"converted_from": Path(src).name, **{f"source_{k}": v for k, v in info.items()}}
    save_checkpoint(out_dir, model, tok, meta=meta)
    return model.eval(), tok


def main(argv=None) -> int:
    p = ArgumentParser(prog=PROG,
                description="Import a reference (AileenKoneko/K-language-model) v2 checkpoint.")
    p.add_argument("src", help="source .pt checkpoint")
    p.add_argument("out_dir", help="output checkpoint directory")
    p.add_argument("--tokenizer", required=True, choices=("char", "byte"))
    p.add_argument("--text", help="training text (required for --tokenizer char)")
    p.add_argument("--gamma-min", type=float, required=True, help="gamma_min the source was trained with")
    p.add_argument("--gamma-max", type=float, default=1.0)
    p.add_argument("--alpha-cap", type=float, required=True, help="alpha_cap the source was trained with")
    p.add_argument("--window", type=int, default=2048, help="default evaluation window stored in the config")
    p.add_argument("--rosa", choices=("exact", "reference", "off"), default=None,
                   help="how to compute ROSA (required when the checkpoint has trained ROSA weights): reference = "
                        "the reference implementation's automaton (its released checkpoints), exact = the "
                        "definition, off = drop the ROSA weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT_DIR")
    p.add_argument("--format", default="kop", choices=("kop", "hf"),
                   help="kop: this package's checkpoint; hf: a transformers directory (needs the [hf] extra)")
    a = p.parse_args(argv)
    try:
        model, tok = convert(a.src, a.out_dir, tokenizer=a.tokenizer, text=a.text, gamma_min=a.gamma_min,
                             gamma_max=a.gamma_max, alpha_cap=a.alpha_cap, window=a.window, overwrite=a.overwrite,
                             rosa=a.rosa, format=a.format)
    except (ConvertError, CheckpointError, OSError) as e:
        return fail(PROG, e)
    c = model.config
    print(f"wrote {a.out_dir}: vocab {c.vocab_size}, d_model {c.d_model}, n_k2 {c.n_k2}, rank {c.rank}, "
          f"kernel {c.kernel_size} ({'shared' if c.shared_kernel else 'per layer'}), head {c.head}, "
          f"rosa {c.rosa}{'' if c.rosa == 'off' or c.rosa_layers is None else f' on K2 layers {c.rosa_layers}'}, "
          f"{model.num_parameters()} parameters")
    return 0

