"""Chunk sizes shared by the Triton kernels and the ops that call them -- their one home.

Importing this module does not import Triton (``kop_triton.ops.library``'s fake kernels need
CHUNK on machines without it).
"""

# Tokens per chunk of the chunk-parallel kernels: the granularity of the chunk states that a
# forward stores for its backward (``kop_triton.kernels.scan`` layout).
CHUNK = 64
# Sub-chunk of the intra-chunk decomposition: the smallest tl.dot tile (M, N, K >= 16), which also
# keeps the exact diagonal sub-blocks small (SUB_CHUNK steps of (SUB_CHUNK, R) work each).
SUB_CHUNK = 16

# The largest rank R (key channels) the Triton kernels take: their (BT, R) and (R, BD) tiles hold R
# padded to a power of two, tuned and compile-gated up to 128 (kernels/settings.py).  One check,
# ``check_rank``, used by the ops' argument checks and every chunked launcher.
MAX_RANK = 128


def check_rank(R: int) -> int:
    """R if 1 <= R <= MAX_RANK, else a ValueError naming R and the limit."""
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"the triton backend supports R <= {MAX_RANK} (rank, the key channels of q and k), "
                         f"got R = {R}; use backend='chunked' for a larger rank")
    return R
