"""Test-only race check: the Triton interpreter runs every grid in a chosen program order.

On a GPU the programs of one launch run in no defined order (and concurrently); the interpreter runs
them one after another in row-major order (axis 0 outermost, axis 2 innermost).  A kernel whose
programs read what other programs of the same launch write passes under the interpreter by luck
and races on a GPU.  Running the kernel tests with the grid reversed and shuffled makes such a
kernel fail on the CPU.

How: the interpreter's ``GridExecutor.__call__`` announces each grid with
``interpreter_builder.set_grid_dim(nx, ny, nz)`` and then, for every program, calls
``interpreter_builder.set_grid_idx(x, y, z)`` (which ``tl.program_id`` reads) before running it.
``install()`` wraps both on the builder: the i-th ``set_grid_idx`` call of a launch is given the
program at position ``perm[i]`` of a permutation of all nx * ny * nz programs instead, so the
programs run in the order of ``perm`` whatever the grid's shape (1-D, 2-D or 3-D).  A wrapper
around ``GridExecutor.__call__`` checks afterwards that the launch announced its grid and ran
exactly nx * ny * nz programs through the hook; any other interpreter (a missing internal, a
loop that does not go through these calls) raises ``GridOrderError`` instead of silently running
in order.  Checked on Triton 3.4, 3.6 and 3.9 (``triton/runtime/interpreter.py``, the same loop in
each): in-order, reversed and shuffled orders of 1-D and 3-D grids as tests/test_race.py expects.

Orders: ``"in-order"`` (the interpreter's own), ``"reverse"``, ``"shuffle:SEED"`` (a permutation
drawn per launch from SEED, the running test's id, the kernel's name, the grid and how many
launches of that kernel with that grid this test made before: reproducible for one test whatever
else runs in the process).  ``tests/conftest.py`` installs the hook when ``KOP_GRID_ORDER`` is
set; ``use(order)`` switches order inside a test.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Dict, Optional, Set, Tuple

ORDERS = ("in-order", "reverse", "shuffle:SEED")


class GridOrderError(RuntimeError):
    pass


def parse(order: str) -> Tuple[str, Optional[int]]:
    """'in-order' | 'reverse' | 'shuffle:SEED' -> (mode, seed); anything else a ValueError."""
    if order in ("in-order", "reverse"):
        return order, None
    if isinstance(order, str) and order.startswith("shuffle:"):
        try:
            return "shuffle", int(order.split(":", 1)[1])
        except ValueError:
            pass
    raise ValueError(f"grid order must be one of {list(ORDERS)} (SEED an int), got {order!r}")


class _State:
    order = "in-order"
    installed = False
    # the launch in progress
    kernel: Optional[str] = None
    perm = None
    grid = (1, 1, 1)
    total = 0
    count = 0
    announced = False
    # per test: launches of (kernel, grid) so far, for the shuffle seed
    test_id: Optional[str] = None
    launch_no: Dict[Tuple[str, Tuple[int, int, int]], int] = {}
    # every launch made through the hook: kernel -> bool constexpr name -> values seen
    seen: Dict[str, Dict[str, Set[bool]]] = {}


def _permutation(n: int, grid: Tuple[int, int, int]):
    mode, seed = parse(_State.order)
    if mode == "in-order":
        return None
    if mode == "reverse":
        return range(n - 1, -1, -1)
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    if test_id != _State.test_id:
        _State.test_id, _State.launch_no = test_id, {}
    key = (_State.kernel or "?", grid)
    no = _State.launch_no[key] = _State.launch_no.get(key, -1) + 1
    perm = list(range(n))
    random.Random(f"{seed}|{test_id}|{key[0]}|{grid}|{no}").shuffle(perm)
    return perm


def _interpreter():
    try:
        from triton.runtime import interpreter as interp
    except ImportError as e:                                   # pragma: no cover - triton is a test dependency
        raise GridOrderError(f"the grid-order hook needs triton's interpreter: {e}") from e
    missing = [name for name in ("GridExecutor", "interpreter_builder") if not hasattr(interp, name)]
    builder = getattr(interp, "interpreter_builder", None)
    missing += [f"interpreter_builder.{m}" for m in ("set_grid_dim", "set_grid_idx") if not hasattr(builder, m)]
    if missing or not callable(getattr(getattr(interp, "GridExecutor", None), "__call__", None)):
        import triton
        raise GridOrderError(
            f"the grid-order hook (tests/grid_order.py) does not fit this Triton ({triton.__version__}): "
            f"triton.runtime.interpreter lacks {missing or ['GridExecutor.__call__']}; "
            f"the race check cannot reorder programs here, so it refuses to run rather than run them in order")
    return interp


def install() -> None:
    """Wrap the interpreter's grid loop (idempotent).  Needs TRITON_INTERPRET=1 before triton is
    imported (the loop belongs to the interpreter); raises GridOrderError otherwise."""
    if _State.installed:
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise GridOrderError("the grid-order hook runs Triton kernels through the interpreter: "
                             "set TRITON_INTERPRET=1 (tests/conftest.py does so on a machine without CUDA)")
    interp = _interpreter()
    builder = interp.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    executor_call = interp.GridExecutor.__call__

    def set_grid_dim(nx, ny, nz):
        grid = (int(nx), int(ny), int(nz))
        _State.total, _State.count, _State.announced = grid[0] * grid[1] * grid[2], 0, True
        _State.grid = grid
        _State.perm = _permutation(_State.total, grid)
        return set_dim(nx, ny, nz)

    def set_grid_idx(x, y, z):
        if not _State.announced:
            raise GridOrderError("the interpreter set a program id before announcing its grid "
                                 "(set_grid_dim): tests/grid_order.py does not fit this Triton")
        i = _State.count
        if i >= _State.total:
            raise GridOrderError(f"the interpreter ran more than the {_State.total} programs of grid "
                                 f"{_State.grid}: tests/grid_order.py does not fit this Triton")
        _State.count += 1
        if _State.perm is None:
            return set_idx(x, y, z)
        j = _State.perm[i]
        nx, ny, nz = _State.grid
        return set_idx(j // (ny * nz), (j // nz) % ny, j % nz)

    def call(self, *args, **kwargs):
        fn = getattr(self, "fn", None)
        _State.kernel = getattr(fn, "__name__", repr(fn))
        _record(self, args, kwargs)
        _State.announced, _State.count, _State.total = False, 0, 0
        out = executor_call(self, *args, **kwargs)
        if not _State.announced or _State.count != _State.total:
            raise GridOrderError(
                f"{_State.kernel}: the interpreter ran {_State.count} programs through the grid-order hook "
                f"{'without announcing its grid' if not _State.announced else f'of {_State.total}'}; "
                f"tests/grid_order.py does not fit this Triton's interpreter loop")
        return out

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    interp.GridExecutor.__call__ = call
    _State.installed = True


def _record(executor, args, kwargs) -> None:
    """Note the bool constexprs (the kernels' flags) of a launch, for the race run's coverage check."""
    names = list(getattr(executor, "arg_names", ()) or ())
    bound = dict(zip(names, args))
    bound.update(kwargs)
    flags = _State.seen.setdefault(_State.kernel, {})
    for name, value in bound.items():
        if isinstance(value, bool):
            flags.setdefault(name, set()).add(value)


def set_order(order: str) -> None:
    parse(order)
    _State.order = order


def current_order() -> str:
    return _State.order


@contextlib.contextmanager
def use(order: str):
    """Run the Triton launches inside in ``order`` (installs the hook first)."""
    install()
    prev = _State.order
    set_order(order)
    try:
        yield
    finally:
        _State.order = prev


def launches_seen() -> Dict[str, Dict[str, list]]:
    """kernel -> flag -> sorted values, of every launch made through the hook (JSON-ready)."""
    return {k: {f: sorted(v) for f, v in flags.items()} for k, flags in _State.seen.items()}


def expected_launches() -> Dict[str, Dict[str, list]]:
    """Every kernel and the values of each bool flag that the offline compile gate's CI workload
    launches (``kop_triton.gate``: the ops forward and backward on meta tensors, launches
    recorded, nothing run): what the race run must reach."""
    from kop_triton.gate import run_case, workload
    seen: Dict[str, Dict[str, Set[bool]]] = {}
    for case in workload("ci"):
        for ln in run_case(case):
            flags = seen.setdefault(ln.name, {})
            for name, value in ln.kwargs.items():
                if isinstance(value, bool):
                    flags.setdefault(name, set()).add(value)
    return {k: {f: sorted(v) for f, v in flags.items()} for k, flags in seen.items()}


def missing_launches(expected, seen) -> list:
    """['kernel', 'kernel FLAG=value', ...] expected but never launched."""
    out = []
    for kernel, flags in sorted(expected.items()):
        if kernel not in seen:
            out.append(kernel)
            continue
        for flag, values in sorted(flags.items()):
            for v in values:
                if v not in seen[kernel].get(flag, ()):
                    out.append(f"{kernel} {flag}={v}")
    return out
