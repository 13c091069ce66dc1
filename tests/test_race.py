"""The race check's hook (tests/grid_order.py): the Triton interpreter really runs a grid's programs
in the chosen order, on 1-D, 2-D and 3-D grids, each program once, reproducibly for a seed; a kernel
whose programs depend on each other's writes gives the in-order answer only in order (so the race
run fails such a kernel on the CPU, as it would race on a GPU); and a hook that does not fit the
interpreter fails loudly instead of running in order.

`make test` runs the tests marked ``race`` (kernel tests at small sizes, reaching every kernel and
flag) twice more with KOP_GRID_ORDER=reverse and KOP_GRID_ORDER=shuffle:SEED."""
import types

import pytest
import torch
import triton
import triton.language as tl

import grid_order
from helpers import INTERPRET

pytestmark = pytest.mark.skipif(
    not INTERPRET, reason="the Triton interpreter only (TRITON_INTERPRET=1): it reorders the interpreter's grid "
                          "loop; on CUDA the GPU runs programs in no fixed order itself")


@triton.jit
def _chain_kernel(buf):
    """Program i writes buf[i + 1] = buf[i] + 1: in order buf ends as 0, 1, 2, ...; a racy kernel."""
    pid = tl.program_id(0)
    prev = tl.load(buf + pid)
    tl.store(buf + pid + 1, prev + 1)


@triton.jit
def _order_kernel(counter, order):
    """order[c] = the program's row-major index, c = how many programs ran before it."""
    lin = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    c = tl.atomic_add(counter, 1)
    tl.store(order + c, lin)


def _chain(n=16):
    buf = torch.zeros(n + 1, dtype=torch.int32)
    _chain_kernel[(n,)](buf)
    return buf.tolist()


def _order(grid):
    n = 1
    for g in grid:
        n *= g
    counter, order = torch.zeros(1, dtype=torch.int32), torch.full((n,), -1, dtype=torch.int32)
    _order_kernel[grid](counter, order)
    assert int(counter) == n
    return order.tolist()


GRIDS = [(24,), (4, 6), (2, 3, 4), (1, 1, 5)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_in_order_is_the_interpreters_row_major_loop(grid):
    with grid_order.use("in-order"):
        assert _order(grid) == list(range(len(_order(grid))))
        assert _chain() == list(range(17))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_reverse_runs_every_grid_backwards(grid):
    with grid_order.use("reverse"):
        got = _order(grid)
        assert got == list(range(len(got)))[::-1]
        assert _chain() == [0] + [1] * 16                  # each program saw its predecessor's 0


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_shuffle_runs_each_program_once_in_a_seeded_order(grid, monkeypatch):
    n = len(_order(grid))
    with grid_order.use("shuffle:7"):
        monkeypatch.setenv("PYTEST_CURRENT_TEST", "a (call)")
        first = _order(grid)
        again = _order(grid)                                 # the next launch of this test: another draw
        monkeypatch.setenv("PYTEST_CURRENT_TEST", "b (call)")
        other_test = _order(grid)
        monkeypatch.setenv("PYTEST_CURRENT_TEST", "a (call)")
        replay = _order(grid)                                # test "a" again: the same draws
    with grid_order.use("shuffle:8"):
        monkeypatch.setenv("PYTEST_CURRENT_TEST", "a (call)")
        other_seed = _order(grid)
    for got in (first, again, other_test, replay, other_seed):
        assert sorted(got) == list(range(n))                 # every program exactly once
    assert replay == first
    if n >= 6:
        assert first != list(range(n)) and first != list(range(n))[::-1]
        assert len({tuple(first), tuple(again), tuple(other_test), tuple(other_seed)}) == 4


def test_shuffle_fails_a_kernel_whose_programs_depend_on_each_other():
    with grid_order.use("shuffle:1"):
        assert _chain() != list(range(17))


def test_bad_order_is_refused():
    with pytest.raises(ValueError, match=r"grid order must be one of \['in-order', 'reverse', 'shuffle:SEED'\]"):
        grid_order.set_order("backwards")
    with pytest.raises(ValueError, match="got 'shuffle:x'"):
        grid_order.parse("shuffle:x")


def test_an_interpreter_the_hook_does_not_fit_fails_loudly(monkeypatch):
    from triton.runtime import interpreter as interp
    grid_order.install()
    # a missing internal: refused before anything runs
    monkeypatch.delattr(interp, "GridExecutor")
    with pytest.raises(grid_order.GridOrderError, match="does not fit this Triton"):
        grid_order._interpreter()
    monkeypatch.undo()
    # a grid loop that does not announce its grid through the hooked call: the launch fails
    builder = interp.interpreter_builder
    monkeypatch.setattr(builder, "set_grid_dim", types.MethodType(type(builder).set_grid_dim, builder))
    from triton.runtime.errors import InterpreterError               # what a kernel's error becomes
    with grid_order.use("reverse"), pytest.raises((grid_order.GridOrderError, InterpreterError),
                                                  match="announcing its grid.*does not fit this Triton"):
        _chain()
    monkeypatch.undo()
    with grid_order.use("reverse"):
        assert _chain() == [0] + [1] * 16                    # and the hook works again
