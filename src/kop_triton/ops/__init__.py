from .conv import causal_conv, naive_causal_conv  # noqa: F401
from .k2 import k2_mixer, k2_qk, reference_k2_mixer  # noqa: F401
from .scan import (chunked_decayed_scan, decayed_scan, naive_decayed_scan,  # noqa: F401
                   recurrent_decayed_scan)
