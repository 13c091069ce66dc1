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
