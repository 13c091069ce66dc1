"""lm-evaluation-harness's command line with KStack models registered (as flash-linear-attention's
``evals/harness.py`` does):

    python -m kop_triton.lm_eval run --model hf --model_args pretrained=DIR --tasks TASKS [...]

Every argument goes to lm-eval's CLI unchanged; importing ``kop_triton.hf`` first registers the
"kstack" model type with transformers' Auto classes, so ``--model hf`` loads a directory written
by ``save_hf`` / ``kop-convert --format hf`` (its tokenizer has the eos and pad tokens lm-eval
needs).  Needs ``pip install lm-eval`` and, for a task run (``run --tasks ...``), what its task path
imports: ``datasets``, ``sacrebleu`` and ``pytablewriter`` (``make install`` installs these; a local
task: a YAML file with ``dataset_path: json`` and ``data_files``, passed with ``--include_path``).
"""
from __future__ import annotations

import sys
from typing import List, Optional


def register() -> None:
    """Register the "kstack" model type with transformers' Auto classes (what ``--model hf`` loads)."""
    from . import hf  # noqa: F401  (registration happens on import)


def main(argv: Optional[List[str]] = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"python -m kop_triton.lm_eval needs lm-evaluation-harness: pip install lm-eval ({e})")
    register()
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
