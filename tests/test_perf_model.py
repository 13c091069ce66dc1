"""benchmarks/perf_model.py (a performance model, not a measurement) and benchmarks/model_check.py
(its GPU check's non-GPU half): the occupancy arithmetic against hand-computed CUDA examples, the
model's bound switches, its bytes against benchmarks/traffic.py, every recorded launch priced, the
compile gate's JSON read (not copied), and the profiler-table join.  Nothing is timed."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # the repository root holds benchmarks/

from benchmarks import model_check, perf_model as PM, traffic  # noqa: E402

MODEL_DIR = ROOT / "benchmarks" / "results" / "model"
COMMITTED = MODEL_DIR / "k2_perf_model_bf16_R16_K8.json"
COMMITTED_GATE = MODEL_DIR / "k2_perf_model_gate_sm90.json"


# --------------------------------------------------------------------------------------
# occupancy: CUDA's rules for sm_90, by hand
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("regs, warps, smem, ctas, limiter", [
    # 203 regs: 203*32 = 6496 -> 6656 per warp (unit 256); 16384 per sub-partition / 6656 = 2 warps,
    # x 4 = 8 warps per SM (not 65536 / 6656 = 9): one 8-warp CTA (issue 20's _k2_dx_kernel)
    (203, 8, 0, 1, "registers"),
    # 99 regs: 3168 -> 3328; 16384 / 3328 = 4 per sub-partition: 16 warps, four 4-warp CTAs
    (99, 4, 0, 4, "registers"),
    # 253 regs, 4 warps: 8096 -> 8192; 2 per sub-partition: 8 warps, 2 CTAs (issue 20's _bwd_dqk_kernel)
    (253, 4, 0, 2, "registers"),
    # 32 regs, 1 warp: 64 warps by registers and by the warp limit, but at most 32 CTAs per SM
    (32, 1, 0, 32, "ctas"),
    # 48 KB static smem: (48K + 1K reserved) -> 228K / 50176 = 4 CTAs (16 warps), registers would allow 16
    (32, 4, 49152, 4, "shared memory"),
    # 40 regs, 8 warps: 1280 per warp; 12 per sub-partition: 48 warps = 6 CTAs; warp limit 64 / 8 = 8
    (40, 8, 0, 6, "registers"),
])
def test_occupancy_hand_examples(regs, warps, smem, ctas, limiter):
    occ = PM.occupancy(regs, warps, smem)
    assert occ["ctas_per_sm"] == ctas and occ["warps_per_sm"] == ctas * warps, occ
    assert occ["limiter"] == limiter, occ


def test_occupancy_refuses_what_cannot_launch():
    assert PM.occupancy(256, 4, 0)["ctas_per_sm"] == 0           # over 255 registers a thread
    assert PM.occupancy(32, 4, 228 * 1024)["ctas_per_sm"] == 0   # over 227 KB a block
    assert PM.occupancy(255, 32, 0)["ctas_per_sm"] == 0          # 32 warps x 8192 > 65536 registers


# --------------------------------------------------------------------------------------
# the bound switches, on synthetic launches
# --------------------------------------------------------------------------------------


def _launch(kernel, programs, act, kwargs=None, regs=64, warps=4, stages=1, cp_async=0, phase="fwd"):
    return {"phase": phase, "kernel": kernel, "grid": [programs], "programs": programs, "kwargs": kwargs or {},
            "act": act, "small": 0.0, "states": 0.0, "bytes_source": "test", "registers": regs, "smem": 0,
            "num_warps": warps, "num_stages": stages, "cp_async": cp_async, "config": "test"}


def test_one_program_walk_is_latency_bound():
    S = PM.Shape(64, 1 << 20)
    # R * D = 128 state entries (one program of 128): read and written once per chunk of 64 tokens
    r = PM.price_launch(_launch("_state_pass_kernel", 1, 2 * 128 * 4 / 64, {"NT": 16384, "CB": 16, "BT": 64}), S)
    assert r["bound"] == "latency" and r["limit"] == "dependent steps"
    assert r["dependent_steps"] == 1024
    assert r["time_s"] == pytest.approx(1024 * PM.H100.step_latency)
    # the same walk at a state interval of 256 tokens: 4x fewer steps
    w = PM.WhatIf(state_interval=256)
    assert PM.price_launch(_launch("_state_pass_kernel", 1, 16.0, {"NT": 16384, "CB": 16}), S, w=w)[
        "dependent_steps"] == 256


def test_one_program_tile_kernel_is_latency_bound_and_a_full_grid_is_bytes_bound():
    S = PM.Shape(1024, 1 << 20)
    one = PM.price_launch(_launch("_k2_dp_kernel", 1, 1e-3), S)         # 1 KB, all of it in one CTA's flight
    assert one["bound"] == "latency" and one["sms_covered"] == 1
    assert one["time_s"] == pytest.approx(PM.H100.mem_latency)
    # 1 MB through one program: one SM's share of the copy bandwidth
    heavy = PM.price_launch(_launch("_k2_dp_kernel", 1, 1.0), S)
    assert heavy["bound"] == "bytes" and heavy["limit"].startswith("SMs covered")
    assert heavy["time_s"] == pytest.approx(S.tokens / (PM.H100.copy_bw / 132))
    big = PM.price_launch(_launch("_k2_dp_kernel", 16384, 4096.0), S)    # 256 KB a CTA, 132 SMs covered
    assert big["bound"] == "bytes" and big["limit"] == "copy bandwidth" and big["sms_covered"] == 132
    assert big["time_s"] == pytest.approx(4096.0 * S.tokens / PM.H100.copy_bw)
    assert big["fraction_of_copy_speed"] == pytest.approx(1.0)


def test_little_law_in_flight_limit_and_what_pipelining_buys():
    S = PM.Shape(1024, 1 << 20)
    # 8 warps at 203 registers: 1 CTA per SM; 32 x 4 iterations a program: little in flight per CTA
    kw = {"G": 32, "BT": 64, "BC": 16}
    ln = _launch("_k2_dx_kernel", 16384, 7728.0, kw, regs=203, warps=8)
    r = PM.price_launch(ln, S)
    per_cta = 7728.0 * S.tokens / 16384 / 128
    assert r["warps_per_sm"] == 8 and r["bytes_in_flight_per_cta"] == pytest.approx(per_cta)
    assert r["bytes_in_flight"] == pytest.approx(per_cta * 132)
    assert r["achievable_bw"] == pytest.approx(per_cta * 132 / PM.H100.mem_latency)
    assert r["bound"] == "latency" and r["limit"].startswith("bytes in flight")
    # cp.async with 2 stages doubles what is in flight; without cp.async num_stages buys nothing
    piped = PM.price_launch({**ln, "num_stages": 2, "cp_async": 12}, S)
    assert piped["bytes_in_flight"] == pytest.approx(2 * r["bytes_in_flight"])
    assert PM.price_launch({**ln, "num_stages": 2, "cp_async": 0}, S)["time_s"] == pytest.approx(r["time_s"])


def test_fp32_dots_on_cuda_cores_can_be_compute_bound():
    S = PM.Shape(1024, 1 << 20, dtype="fp32")
    kw = {"G": 1, "BT": 64, "BC": 16, "DOT_MODE": 0}
    r = PM.price_launch(_launch("_k2_dx_kernel", 1 << 20, 1.0, kw), S)
    assert r["bound"] == "compute" and r["peak"] == "CUDA cores fp32"
    assert r["time_s"] == pytest.approx(PM.FLOPS["_k2_dx_kernel"](1024, 16, 8, 64) * S.tokens / 67e12)
    r16 = PM.price_launch(_launch("_k2_dx_kernel", 1 << 20, 1.0, {**kw, "DOT_MODE": 1}), PM.Shape(1024, 1 << 20))
    assert r16["peak"] == "tensor cores" and r16["t_compute"] < r["t_compute"] / 10


# --------------------------------------------------------------------------------------
# recorded launches (a child process without the interpreter, as the compile gate)
# --------------------------------------------------------------------------------------

SHAPES = [(64, 2048, "bf16", 16, 8), (1024, 1 << 20, "bf16", 16, 8), (256, 65536, "fp32", 16, 8),
          (24, 300, "bf16", 4, 4), (64, 4096, "fp16", 64, 8)]


@pytest.fixture(scope="module")
def priced():
    code = f"""
import json
from benchmarks import perf_model as PM
out = []
for D, T, dt, R, K in {SHAPES!r}:
    S = PM.Shape(D, T, 1, R, K, dt)
    rec = PM.record(S)
    # ptxas's figures stand in (this test checks the join and the coverage, not the registers)
    fake = [dict(ln, registers=64, smem=0, num_warps=ln["kwargs"]["num_warps"], num_stages=1, cp_async=0)
            for ln in rec]
    out.append({{"recorded": rec, "priced": PM.price(S, fake)}})
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_recorded_launch_is_priced(priced):
    for (D, T, dt, R, K), res in zip(SHAPES, priced):
        rec, rows = res["recorded"], res["priced"]["launches"]
        launched = [r for r in rows if r.get("programs")]
        assert [(r["phase"], r["kernel"]) for r in launched] == [(ln["phase"], ln["kernel"]) for ln in rec], (D, T)
        assert all(r["time_s"] > 0 and r["bound"] in ("bytes", "latency", "compute") for r in launched)
        assert not [r for r in rows if r["bound"] == "-"], "a traffic.py row with no recorded launch"
        assert {ln["phase"] for ln in rec} == {"fwd", "bwd"}
        assert [r["programs"] for r in launched] == [math.prod(ln["grid"]) for ln in rec]


def test_bytes_agree_with_traffic_py(priced):
    for (D, T, dt, R, K), res in zip(SHAPES, priced):
        m = traffic.model("fused", traffic.Shape(1, T, D, R, K, 4 if dt == "fp32" else 2))
        rows = res["priced"]["launches"]
        assert all(r["bytes_source"] == "benchmarks/traffic.py" for r in rows), (D, T)
        for ph in ("fwd", "bwd"):
            assert sum(r["bytes_per_token"] for r in rows if r["phase"] == ph) == pytest.approx(
                m[ph]["bytes_per_token"]), (D, T, ph)
            assert sorted(r["traffic_name"] for r in rows if r["phase"] == ph) == \
                sorted(ln["name"] for ln in m[ph]["launches"]), (D, T, ph)
        ops = res["priced"]["ops"]
        assert ops["fwd_bwd"]["time_s"] == pytest.approx(ops["fwd"]["time_s"] + ops["bwd"]["time_s"])


def test_the_walk_follows_the_recorded_chunks_per_step(priced):
    for (D, T, dt, R, K), res in zip(SHAPES, priced):
        for ln, r in zip(res["recorded"], [r for r in res["priced"]["launches"] if r.get("programs")]):
            if ln["kernel"] == "_state_pass_kernel":
                assert r["dependent_steps"] == math.ceil(ln["kwargs"]["NT"] / ln["kwargs"]["CB"])


# --------------------------------------------------------------------------------------
# the compile gate's JSON
# --------------------------------------------------------------------------------------


def _gate_doc():
    rows = [
        {"target": "sm_90", "kernel": "_k2_out_kernel", "dtype": "bfloat16/float32", "config": "BD=64, num_warps=4",
         "registers": 99, "smem": 8192, "num_warps": 4, "num_stages": 3, "cp_async": 0, "mma": 12, "error": None},
        {"target": "sm_80", "kernel": "_k2_out_kernel", "dtype": "bfloat16/float32", "config": "BD=64, num_warps=4",
         "registers": 120, "smem": 8192, "num_warps": 4, "num_stages": 3, "error": None},
        {"target": "sm_90", "kernel": "_k2_dx_kernel", "dtype": "bfloat16/float32", "config": "BD=32, num_warps=8",
         "error": "does not compile"},
    ]
    return {"meta": {"triton": "3.6.0"}, "rows": rows}


def test_gate_rows_are_read_by_target_and_key():
    idx = PM.gate_index(_gate_doc())
    assert set(idx) == {("_k2_out_kernel", "bfloat16/float32", "BD=64, num_warps=4")}      # sm_90, compiled
    ln = {"phase": "fwd", "kernel": "_k2_out_kernel", "dtype": "bfloat16/float32", "config": "BD=64, num_warps=4"}
    (got,) = PM.attach_gate([ln], idx)
    assert (got["registers"], got["smem"], got["num_warps"], got["num_stages"], got["cp_async"]) == (99, 8192, 4, 3, 0)
    with pytest.raises(PM.MissingSpecs, match=r"_k2_dx_kernel \[bfloat16/float32; BD=32.*--write-gate"):
        PM.attach_gate([dict(ln, kernel="_k2_dx_kernel", config="BD=32, num_warps=8")], idx)
    with pytest.raises(ValueError, match="not a compile-gate JSON"):
        PM.gate_index({"summary": []})


def test_committed_model_reads_its_registers_from_the_committed_gate_json():
    """The committed table's registers, shared memory and warps are the gate JSON's, launch by launch."""
    doc = json.loads(COMMITTED.read_text())
    idx = PM.gate_index(json.loads(COMMITTED_GATE.read_text()))
    assert doc["label"].startswith("model") and doc["priced_commit"]
    n = 0
    for sh in doc["shapes"]:
        for ln in [r for r in sh["launches"] if r.get("programs")]:
            g = idx[(ln["kernel"], ln["dtype"], ln["config"])]
            assert (ln["registers"], ln["smem"], ln["num_warps"], ln["num_stages"]) == \
                (g["registers"], g["smem"], g["num_warps"], g["num_stages"])
            assert ln["warps_per_sm"] == PM.occupancy(g["registers"], g["num_warps"], g["smem"])["warps_per_sm"]
            n += 1
    assert n > 0
    # the shapes the issue asks for, bf16, and every what-if priced at each
    bf16 = {(sh["shape"]["D"], sh["shape"]["T"]) for sh in doc["shapes"] if sh["shape"]["dtype"] == "bf16"}
    assert bf16 == {(D, T) for D in (64, 256, 1024) for T in (2048, 65536, 1 << 20)}
    assert all(len(sh["whatifs"]) == len(PM.WHATIFS) for sh in doc["shapes"])


def test_the_cli_refuses_the_interpreter_and_a_missing_gate(tmp_path):
    assert os.environ.get("TRITON_INTERPRET") in ("1", "0", None)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.perf_model", "--gate-json", str(tmp_path / "no.json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--gate-json" in p.stderr and "cannot read" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "benchmarks.perf_model", "--gate-json", "x.json"],
                       cwd=ROOT, env=dict(env, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "TRITON_INTERPRET" in p.stderr, p.stderr


# --------------------------------------------------------------------------------------
# model_check: the profiler table and the join (its GPU half cannot run here)
# --------------------------------------------------------------------------------------

def _table(rows, head=("Name", "Self CUDA", "Self CUDA %", "CUDA total", "CUDA time avg", "# of Calls")):
    """A table as torch.profiler's key_averages().table() lays it out: right-aligned cells, two spaces
    between columns, a dashed rule above and below the header and at the end."""
    w = [max(len(h), 12, *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    rule = "  ".join("-" * n for n in w) + "  "
    line = lambda cells: "  ".join(c.rjust(n) for c, n in zip(cells, w)) + "  "  # noqa: E731
    return "\n".join([rule, line(head), rule, *map(line, rows), rule, "Self CUDA time total: 31.250ms", ""])


TABLE = _table([
    ("_k2_dx_kernel", "12.500ms", "40.00%", "12.500ms", "2.500ms", "5"),
    ("_chunk_state_kernel", "1.100ms", "3.52%", "1.100ms", "110.000us", "10"),
    ("_state_pass_kernel", "10.200ms", "32.64%", "10.200ms", "1.020ms", "10"),
    ("void at::native::vectorized_elementwise_kernel<4, ...", "50.000us", "0.16%", "50.000us", "10.000us", "5"),
])


def test_profiler_table_is_parsed():
    got = model_check.parse_profiler_table(TABLE)
    assert got["_k2_dx_kernel"] == {"calls": 5, "device_total_us": pytest.approx(12500.0)}
    assert got["_chunk_state_kernel"] == {"calls": 10, "device_total_us": pytest.approx(1100.0)}
    assert got["_state_pass_kernel"]["device_total_us"] == pytest.approx(10200.0)
    assert len(got) == 4
    with pytest.raises(ValueError, match="not a torch.profiler table"):
        model_check.parse_profiler_table("Name  Self CUDA\nfoo 1us\n")
    device = TABLE.replace("CUDA total", "Device total")
    assert model_check.parse_profiler_table(device)["_k2_dx_kernel"]["device_total_us"] == pytest.approx(12500.0)


def test_measured_joins_the_model_per_kernel():
    rows = [{"kernel": "_chunk_state_kernel", "programs": 10, "time_s": 50e-6, "bound": "bytes"},
            {"kernel": "_state_pass_kernel", "programs": 8, "time_s": 1024e-6, "bound": "latency"},
            {"kernel": "_chunk_state_kernel", "programs": 10, "time_s": 50e-6, "bound": "bytes"},
            {"kernel": "_state_pass_kernel", "programs": 8, "time_s": 1024e-6, "bound": "latency"},
            {"kernel": "_k2_dx_kernel", "programs": 100, "time_s": 2000e-6, "bound": "latency"},
            {"kernel": "x^T dp (cuBLAS)", "programs": 0, "time_s": 1e-6, "bound": "bytes"}]
    out = {r["kernel"]: r for r in model_check.join(rows, model_check.parse_profiler_table(TABLE), iters=5)}
    cs = out["_chunk_state_kernel"]
    assert cs["launches"] == 2 and cs["predicted_us"] == pytest.approx(100.0)
    assert cs["measured_us"] == pytest.approx(220.0) and cs["measured_launches"] == 2
    assert cs["error"] == pytest.approx(1.2)
    assert out["_state_pass_kernel"]["error"] == pytest.approx(2040.0 / 2048.0 - 1)
    assert out["_k2_dx_kernel"]["error"] == pytest.approx(0.25)
    other = [r for r in out.values() if r.get("note")]
    assert len(other) == 1 and other[0]["predicted_us"] is None and other[0]["measured_us"] == pytest.approx(10.0)
    # without a measurement: the prediction only
    alone = model_check.join(rows, None, iters=5)
    assert all(r["measured_us"] is None and r["error"] is None for r in alone) and len(alone) == 3


def test_model_check_without_cuda_writes_the_prediction(tmp_path):
    out = tmp_path / "mc.json"
    assert model_check.main(["--D", "64", "--T", "1048576", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (sh,) = doc["shapes"]
    assert sh["status"].startswith("no CUDA") and doc["priced_commit"]
    assert {r["kernel"] for r in sh["rows"]} >= {"_state_pass_kernel", "_k2_dx_kernel", "_k2_out_kernel"}
    walk = next(r for r in sh["rows"] if r["kernel"] == "_state_pass_kernel")
    assert walk["launches"] == 2 and walk["bounds"] == ["latency", "latency"]


def test_cli_prices_the_kernels_checked_out(tmp_path):
    """The whole path on today's kernels: the gate compiled on the model's launches (--write-gate),
    its JSON read back, every launch priced, the JSON and the table written (labelled a model)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    gate, out, md = tmp_path / "gate.json", tmp_path / "m.json", tmp_path / "m.md"
    p = subprocess.run([sys.executable, "-m", "benchmarks.perf_model", "--D", "24", "--T", "300", "--R", "4", "--K",
                        "4", "--write-gate", str(gate), "--jobs", "2", "--json", str(out), "--md", str(md)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    g, doc = json.loads(gate.read_text()), json.loads(out.read_text())
    assert g["summary"][0]["target"] == "sm_90" and g["summary"][0]["compile_errors"] == 0
    (sh,) = doc["shapes"]
    idx = PM.gate_index(g)
    launched = [r for r in sh["launches"] if r.get("programs")]
    assert launched and all(idx[(r["kernel"], r["dtype"], r["config"])]["registers"] == r["registers"]
                            for r in launched)
    assert md.read_text().startswith("# K2 fused mixer: performance model (model, not a measurement)")
    assert "| bf16 | 24 | 300 |" in md.read_text()


def test_perf_model_diff_joins_two_runs_launch_by_launch(capsys):
    """benchmarks.perf_model_diff: per shape, the op's figures before -> after and every launch of
    either run on its own row (a launch only one run has shows '-' on the other side)."""
    from benchmarks import perf_model_diff

    def run(walk_us, extra):
        launches = [{"phase": "fwd", "kernel": "_state_pass_kernel", "bytes_per_token": 128.0, "dependent_steps": 9,
                     "warps_per_sm": 32, "time_s": walk_us * 1e-6, "bound": "latency", "limit": "dependent steps"}]
        launches += extra
        op = {"time_s": sum(x["time_s"] for x in launches), "fraction_of_copy_bound": 0.25, "walk_share": 0.5}
        return {"shapes": [{"shape": {"dtype": "bf16", "D": 64, "T": 2048}, "launches": launches,
                            "ops": {"fwd_bwd": op}}]}

    import json
    import tempfile
    import os
    new = {"phase": "fwd", "kernel": "_group_sum_kernel", "bytes_per_token": 64.0, "dependent_steps": 1,
           "warps_per_sm": 40, "time_s": 2e-6, "bound": "bytes", "limit": "copy bandwidth"}
    with tempfile.TemporaryDirectory() as d:
        pb, pa = os.path.join(d, "b.json"), os.path.join(d, "a.json")
        json.dump(run(1024.0, []), open(pb, "w"))
        json.dump(run(8.0, [new]), open(pa, "w"))
        perf_model_diff.main([pb, pa, "bf16"])
    out = capsys.readouterr().out
    assert "**bf16, D = 64, T = 2,048**: fwd+bwd 1,024.0 us" in out and "-> 10.0 us" in out
    assert "| fwd _state_pass_kernel | 128 | 9 | 32 | 1,024.0 lat:steps | 128 | 9 | 32 | 8.0 lat:steps |" in out
    assert "| fwd _group_sum_kernel | - | - | - | - | 64 | 1 | 40 | 2.0 byt:bw |" in out
