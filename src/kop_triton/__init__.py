"""kop-triton: K-Operators (decayed scan + causal Kbase convolution) with fused Triton kernels.

The public names below are imported on first use (PEP 562), so that ``import kop_triton.cli``
(what the console scripts load first) does not import torch: a Ctrl-C during a tool's start-up
is then caught by the tool (one line, exit status 130) instead of ending in a traceback."""
import importlib

_PUBLIC = {"causal_conv": ".ops", "decayed_scan": ".ops", "k2_mixer": ".ops", "KOperator": ".modules",
           "KStackConfig": ".model", "KStackLM": ".model"}

__version__ = "0.1.0"
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kop_triton' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))
