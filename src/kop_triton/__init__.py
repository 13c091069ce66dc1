"""kop-triton: K-Operators (decayed scan + causal Kbase convolution) with fused Triton kernels."""
from .ops import causal_conv, decayed_scan, k2_mixer  # noqa: F401
from .modules import KOperator  # noqa: F401
from .model import KStackConfig, KStackLM  # noqa: F401

__version__ = "0.1.0"
