import os
import shutil
import sys

# Triton kernels run through the interpreter on machines without a GPU; this must be set
# before triton is imported anywhere.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))
