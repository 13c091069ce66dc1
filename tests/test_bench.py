"""The benchmark harness: runs end to end on tiny sizes, writes a well-formed JSON document, and
checks every method against the float64 reference before timing it.  No timing is asserted."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root holds benchmarks/

from benchmarks import bench_k2, bench_scan, harness, run
from benchmarks.methods import (METHODS, Method, Problem, mask_decayed_scan, naive_scan_rows,
                                reference_rows, select)
from benchmarks.sweep import SweepSpec, run_sweep
from kop_triton.ops.k2 import reference_k2_mixer
from kop_triton.ops.scan import naive_decayed_scan

from helpers import assert_close, scan_inputs

STATUSES = {"ok", "skipped", "over_budget", "oom", "error", "wrong"}
RECORD_KEYS = {"method", "op", "group", "label", "mode", "dtype", "B", "T", "D", "R", "K", "tokens",
               "status", "reason", "sweep", "op_min_bytes_per_token", "bytes_per_token_model"}
OK_KEYS = {"time_ms", "time_per_seq_ms", "tokens_per_s", "peak_mem_bytes", "error", "copy_bound_ms",
           "fraction_of_copy_bound"}
TINY = ["--T", "16,40", "--tokens", "80", "--D", "12", "--R", "3", "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _validate_doc(doc: dict, expect_methods) -> None:
    assert doc["schema"] == "kop-triton-bench/1"
    for k in ("created", "command", "machine", "settings", "sweeps", "results", "copy_bound", "slopes",
              "crossovers"):
        assert k in doc, k
    assert doc["machine"]["torch_threads"] == 1 == doc["settings"]["torch_threads"]
    assert doc["settings"]["memory_method"] and doc["settings"]["timing_method"]
    seen = set()
    for r in doc["results"]:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert r["status"] in STATUSES, r
        if r["method"] != "scan/fla_chunk_gla":   # a third-party peer may reject tiny shapes; ours may not
            assert r["status"] not in ("error", "wrong"), r
        seen.add(r["method"])
        if r["method"].endswith(("triton", "triton_fused", "triton_unfused", "fla_chunk_gla")) \
                and not torch.cuda.is_available():
            assert r["status"] == "skipped" and "no CUDA device" in r["reason"], r
        if r["status"] == "ok":
            assert OK_KEYS <= set(r), OK_KEYS - set(r)
            tol = harness.TOLERANCE[torch.float32]
            # checked against the float64 reference before being timed
            assert r["error"]["output"] <= tol["output"], r
            if r["mode"] == "fwd_bwd":
                grads = r["error"]["grads"]
                assert grads, r
                assert all(e is not None and e <= tol["grads"] for e in grads.values()), r
            t = r["time_ms"]
            assert 0 < t["p20"] <= t["median"] <= t["p80"]
            assert r["peak_mem_bytes"] > 0
            assert math.isclose(r["tokens_per_s"], r["tokens"] / (t["median"] * 1e-3), rel_tol=1e-4)
            assert r["fraction_of_copy_bound"] > 0
    assert set(expect_methods) <= seen, set(expect_methods) - seen
    for s in doc["slopes"]:
        assert s["points"] >= 2 and math.isfinite(s["time_slope"])


def test_harness_quick_end_to_end(tmp_path, capfd):
    out = tmp_path / "res"
    doc = run.main(["--quick", "--out", str(out), *TINY, "--shape-T", "24", "--shape-tokens", "48",
                    "--shape-D", "8", "--shape-R", "2", "--lm-batch", "1", "--lm-T", "24", "--lm-steps", "1"])
    console = capfd.readouterr()
    # no torch.profiler (kineto) banner lines, and a summary at the end saying where the results are
    assert "USDT" not in console.err and "profiler_start" not in console.err + console.out
    tail = console.err[console.err.index("== benchmark summary"):]
    assert f"results: {out / 'results.json'}" in tail and "measurements:" in tail and "tokens/s" in tail, tail
    assert "git-ignored" not in tail                                   # an explicit --out is not scratch
    scratch = run.summary(doc, str(tmp_path / "_scratch" / "x"))        # the default folder: say how to keep it
    assert any("git-ignored" in line and "--out benchmarks/results/" in line for line in scratch), scratch
    on_disk = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["mode"], r["T"], r["status"]) for r in on_disk["results"]] == \
        [(r["method"], r["mode"], r["T"], r["status"]) for r in doc["results"]]
    assert on_disk["complete"] is True
    _validate_doc(on_disk, [m.name for m in METHODS if m.name not in ("k2/naive", "k2/recurrent")])
    ok = {(r["method"], r["mode"]) for r in doc["results"] if r["status"] == "ok"}
    for name in ("scan/chunked", "scan/naive", "scan/recurrent", "scan/mask", "k2/chunked", "conv/conv1d",
                 "attention/sdpa"):
        assert (name, "fwd") in ok and (name, "fwd_bwd") in ok, name
    assert {s["method"] for s in doc["slopes"]} >= {"scan/chunked", "attention/sdpa"}
    assert any(c["ours"] == "scan/chunked" for c in doc["crossovers"])
    assert doc["lm_throughput"]["runs"], "the LM throughput entry is always recorded"
    for r in doc["lm_throughput"]["runs"]:
        assert r["status"] in {"ok", "skipped"}, r
    assert (out / "results.md").read_text().count("|") > 20
    assert list(out.glob("*_time.png")) and list(out.glob("*_memory.png"))


def test_bench_scan_and_k2_write_json(tmp_path):
    p = tmp_path / "scan.json"
    bench_scan.main([*TINY, "--json", str(p)])
    doc = json.loads(p.read_text())
    _validate_doc(doc, bench_scan.BACKENDS)
    names = {s["method"] for s in doc["slopes"]}
    assert {"scan/chunked", "scan/naive", "scan/recurrent"} <= names
    p = tmp_path / "k2.json"
    bench_k2.main([*TINY, "--json", str(p), "--modes", "fwd_bwd"])
    doc = json.loads(p.read_text())
    _validate_doc(doc, bench_k2.VARIANTS)
    fused = [r for r in doc["results"] if r["method"] == "k2/triton_fused"]
    unfused = [r for r in doc["results"] if r["method"] == "k2/chunked"]
    assert fused[0]["bytes_per_token_model"] < unfused[0]["bytes_per_token_model"]
    # the performance model's per-launch prediction rides along (a model: benchmarks/perf_model.py)
    pm = doc["perf_model"]
    assert pm["label"].startswith("model") and pm["priced_commit"] and "error" not in pm
    sh = next(s for s in pm["shapes"] if (s["shape"]["D"], s["shape"]["T"], s["shape"]["dtype"]) == (1024, 1 << 20, "bf16"))
    assert {r["kernel"] for r in sh["launches"]} >= {"_k2_out_kernel", "_k2_dx_kernel", "_state_pass_kernel"}
    assert all(r["time_s"] > 0 and r["bound"] in ("bytes", "latency", "compute") for r in sh["launches"])


def _problem(T=37, B=2, D=6, R=3, dtype=torch.float64):
    return Problem(B, T, D, R, 4, dtype, torch.device("cpu"), seed=1)


@pytest.mark.parametrize("T", [1, 5, 37])
def test_row_reference_is_the_naive_formula(T):
    q, k, v, g, _ = scan_inputs(2, T, 3, 5, requires_grad=False)
    rows = torch.arange(T)
    o = naive_decayed_scan(q, k, v, g)[0]
    assert_close("rows", naive_scan_rows(q, k, v, g, rows), o, 1e-12)
    sub = torch.tensor([0, T - 1])
    assert_close("sampled rows", naive_scan_rows(q, k, v, g, sub), o[:, sub], 1e-12)


def test_k2_and_attention_row_references():
    prob = _problem()
    rows = harness.check_rows(prob.T, max_rows=96)
    inp = prob.inputs("k2")
    y = reference_k2_mixer(*(inp[n] for n in ("x", "u", "v", "alpha", "gamma", "kernel", "gate_logit")),
                           scan_backend="naive")[0]
    assert_close("k2 rows", reference_rows("k2", inp, rows), y[:, rows], 1e-12)
    a = prob.inputs("attention")
    o = torch.nn.functional.scaled_dot_product_attention(a["q"], a["k"], a["v"], is_causal=True)
    assert_close("attention rows", reference_rows("attention", a, rows), o[:, :, rows], 1e-12)


def test_check_rows_sampling():
    r = harness.check_rows(1000, max_rows=96)
    assert len(r) == 96 and r[0] == 0 and r[-1] == 999 and bool((r[1:] > r[:-1]).all())
    assert torch.equal(harness.check_rows(50), torch.arange(50))


def test_mask_formulation_matches_naive():
    q, k, v, g, _ = scan_inputs(2, 29, 4, 5, requires_grad=False)
    assert_close("mask", mask_decayed_scan(q, k, v, g), naive_decayed_scan(q, k, v, g)[0], 1e-12)


def _sweep_once(methods, Ts=(16, 32), budget=None, modes=("fwd", "fwd_bwd")):
    spec = SweepSpec("t", methods, list(Ts), 64, [8], [3], ["fp32"], list(modes))
    return run_sweep(spec, torch.device("cpu"), budget or harness.Budget(), lambda m: None)[0]


def test_wrong_method_is_caught_before_timing():
    chunked = select(["scan/chunked"])[0]
    off = Method("scan/off_by_one_percent", "scan", "ours", "wrong on purpose",
                 lambda i: chunked.fn(i) * 1.01)
    nograd = Method("scan/detached_gamma", "scan", "ours", "drops the gamma gradient",
                    lambda i: chunked.fn({**i, "gamma": i["gamma"].detach()}))
    recs = _sweep_once([off, nograd, chunked])
    by = {(r["method"], r["mode"], r["T"]): r for r in recs}
    r = by[("scan/off_by_one_percent", "fwd", 16)]
    assert r["status"] == "wrong" and "time_ms" not in r and r["error"]["output"] > 1e-3
    assert by[("scan/detached_gamma", "fwd", 16)]["status"] == "ok"
    r = by[("scan/detached_gamma", "fwd_bwd", 16)]
    assert r["status"] == "wrong" and "gamma" in r["reason"], r
    assert by[("scan/detached_gamma", "fwd_bwd", 32)]["status"] == "wrong"   # never timed later either
    assert by[("scan/chunked", "fwd_bwd", 32)]["status"] == "ok"


def test_budget_and_failures_are_recorded_not_raised():
    def boom(i):
        raise RuntimeError("kernel exploded")

    def todo(i):
        raise NotImplementedError("later")
    methods = [Method("scan/boom", "scan", "ours", "raises", boom),
               Method("scan/todo", "scan", "ours", "not implemented", todo),
               select(["scan/naive"])[0]]
    recs = _sweep_once(methods, Ts=(16, 32, 64), budget=harness.Budget(time_s=1e-9), modes=("fwd",))
    by = {(r["method"], r["T"]): r for r in recs}
    assert by[("scan/boom", 16)]["status"] == "error" and "exploded" in by[("scan/boom", 16)]["reason"]
    assert by[("scan/todo", 16)]["status"] == "skipped" and "not implemented" in by[("scan/todo", 16)]["reason"]
    assert by[("scan/todo", 64)]["status"] == "skipped"
    assert by[("scan/naive", 16)]["status"] == "ok"          # the first point always runs
    assert by[("scan/naive", 32)]["status"] == "over_budget" and by[("scan/naive", 64)]["status"] == "over_budget"
    # a memory estimate over budget stops even the first point
    recs = _sweep_once([select(["scan/mask"])[0]], Ts=(16,), budget=harness.Budget(mem_bytes=1.0), modes=("fwd",))
    assert recs[0]["status"] == "over_budget" and "GiB" in recs[0]["reason"]


def test_peak_memory_counts_torch_allocations():
    dev = torch.device("cpu")
    n = 1 << 20

    def call():
        a = torch.ones(n)          # 4 MiB
        b = torch.ones(2 * n)      # 8 MiB, both live
        del a
        return b.sum()
    peak, result = harness.peak_memory(call, dev)
    assert 12 * 2 ** 20 <= peak < 13 * 2 ** 20
    assert float(result) == 2 * n


def test_slope_and_crossover():
    Ts = [512, 1024, 2048, 4096]
    assert harness.fit_loglog_slope(Ts, [3e-6 * t ** 2 for t in Ts]) == pytest.approx(2.0)
    assert harness.fit_loglog_slope(Ts, [5.0 * t for t in Ts]) == pytest.approx(1.0)
    assert harness.fit_loglog_slope([512], [1.0]) is None
    ours = {t: 1.0 * t for t in Ts}
    att = {t: 1e-3 * t ** 2 for t in Ts}          # equal at T = 1000
    c = harness.crossover(Ts, ours, att)
    assert c["T"] == 1000
    assert harness.crossover(Ts, {t: 0.1 for t in Ts}, att)["T"] is None
    assert harness.scale_factor(2, 1, 2048, 4, 512) == pytest.approx(4.0)


def test_bench_rosa_writes_json(tmp_path):
    from benchmarks import bench_rosa
    text = tmp_path / "t.txt"
    text.write_text("the king and the queen; the crown and the sword.\n" * 40)
    out = tmp_path / "rosa.json"
    assert bench_rosa.main(["--text", str(text), "--batch", "3", "--window", "64", "--threads", "1,2",
                            "--repeats", "2", "--new", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["mode"], r["threads"]) for r in res["batch"]["results"]] == [
        ("exact", 1), ("exact", 2), ("reference", 1), ("reference", 2)]
    assert all(r["tokens_per_s_best"] > 0 for r in res["batch"]["results"])
    d = res["disagreement"]["whole_text"]
    assert d["positions"] == (res["tokens"] // 64) * 64 and 0 <= d["fraction"] <= 1
    assert res["stream"]["exact"]["tokens"] == res["tokens"] and res["generate"]["reference"]["steps"] == 2


def test_bench_train_without_reference_skips_it_and_times_ours(tmp_path):
    from benchmarks import bench_train
    out = tmp_path / "train.json"
    doc = bench_train.main(["--batch", "1", "--window", "40", "--rounds", "2", "--threads", "1",
                            "--json", str(out), "--quiet"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["reference"]["status"] == "skipped" and "--reference-dir" in doc["reference"]["reason"]
    r = doc["results"]["1"]
    assert list(r) == ["ours"] and len(r["ours"]["step_s"]) == 2
    assert r["ours"]["tokens_per_s"] > 0 and r["ours"]["tokens_per_s_best"] >= r["ours"]["tokens_per_s"]
    bad = bench_train.main(["--batch", "1", "--window", "40", "--rounds", "1", "--reference-dir",
                            str(tmp_path), "--quiet"])
    assert bad["reference"]["status"] == "skipped" and "k_language_model" in bad["reference"]["reason"]


def test_bench_decode_small(tmp_path, capsys):
    from benchmarks import bench_decode
    assert bench_decode.main(["--contexts", "16,40", "--batches", "1,3", "--new", "4", "--window-new", "3",
                              "--window", "48", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "decode.json").read_text())
    assert (tmp_path / "decode.png").stat().st_size > 0
    assert [(r["batch"], r["context"]) for r in res["rows"]] == [(1, 16), (1, 40), (3, 16), (3, 40)]
    for r in res["rows"]:
        assert r["hf_equal_recurrent"] is True                      # HF generate == the recurrent loop
        assert r["window_equal_recurrent"] is True                  # re-running the window == the state
        assert r["recurrent_tokens_per_s"] > 0 and r["window_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0
    assert res["first_token_s"] > 0 and "| batch | context |" in capsys.readouterr().out


def test_recipe_check_compare_and_a_missing_reference(tmp_path):
    """benchmarks/recipe_check.py compare on two small records: the schedule difference is measured
    at every step, the curves drawn; without the reference's package, one clear line."""
    from benchmarks import recipe_check as rc
    from kop_triton.train import lr_factor

    def doc(kind, factors, losses):
        return {"kind": kind, "argv": ["--seed", "42"], "schedule_factor": factors, "params": 10,
                "train_tokens": 90, "val_tokens": 10, "clip_grad_norm": 1.0, "dropouts": [["d", 0.1]],
                "init": {"gate": 0.5}, "groups": [{"name": "decay", "params": 3, "lr": 1e-5, "weight_decay": 0.02,
                                                   "members": ["w"]}],
                "steps": [{"step": i + 1, "loss": v, "lr": factors[i] * 1e-2, "grad_norm": 0.5 + i}
                          for i, v in enumerate(losses)],
                "evals": [{"step": 0, "val_ce": 4.2}, {"step": 3, "val_ce": 3.9}]}

    ours = [lr_factor(s, 2000, 3500, 0.035) for s in range(3500)]
    shifted = [(s + 1) / 2000 if s < 2000 else f for s, f in enumerate(ours)]  # warmup one update ahead
    (tmp_path / "reference.json").write_text(json.dumps(doc("reference", ours, [4.1, 4.0, 3.9])))
    (tmp_path / "ours.json").write_text(json.dumps(doc("ours", shifted, [4.2, 4.0, 3.8])))
    res = rc.compare(argparse.Namespace(dir=str(tmp_path)))
    assert res["schedule"]["max_abs_diff_lr"] == pytest.approx(1e-2 / 2000)     # a warmup step's increment
    assert res["schedule"]["steps_compared"] == 3500 and res["schedule"]["steps_differing_over_1e-12"] == 1999
    assert res["curves"]["steps_compared"] == 3 and res["curves"]["ours"]["steps_clipped"] == 2   # 1.5 and 2.5 > 1
    assert json.loads((tmp_path / "comparison.json").read_text())["schedule"] == res["schedule"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="k_language_model"):
        rc.main(["reference", "--reference-dir", str(tmp_path), "--data-path", "x", "--json", str(tmp_path / "r.json")])
