"""Issue 22's bad-input trial as tests: every case in ``tests/bad_inputs.py`` (the cases the issue
listed and the trial's own) must end in a clear error or correct handling, and a failing command
must leave every file it was pointed at byte-identical (SHA-256 before and after)."""
import pytest

import bad_inputs as B


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return B.Env(tmp_path_factory.mktemp("bad-inputs"))


@pytest.mark.parametrize("case", B.CASES, ids=[f"{c.area}: {c.name}" for c in B.CASES])
def test_bad_input_is_clear_or_correct(case, env):
    if case.area == "hf":
        pytest.importorskip("transformers")
    if case.name.startswith("--tokenizer sentencepiece") or "sp-vocab-size" in case.name:
        pytest.importorskip("sentencepiece")
    outcome, detail = B.classify(case, env)
    assert outcome in ("clear", "correct"), f"{outcome}: {detail}"


def test_the_trial_has_the_issue_cases_and_over_100_of_its_own():
    issue = [c for c in B.CASES if c.origin == "issue"]
    new = [c for c in B.CASES if c.origin == "new"]
    assert len(issue) >= 40 and len(new) >= 100, (len(issue), len(new))


def test_classifier_tells_crash_silent_unclear_and_lost(env, tmp_path):
    """The trial's own judge: each outcome is recognised (so a passing case means something)."""
    f = tmp_path / "kept.txt"
    f.write_text("x")
    cases = {
        "crash": B.Case("t", "c", lambda e: [][1], ["x"]),
        "silent": B.Case("t", "s", lambda e: 1, ["x"]),
        "unclear": B.Case("t", "u", lambda e: (_ for _ in ()).throw(ValueError("bad")), ["flag"]),
        "clear": B.Case("t", "k", lambda e: (_ for _ in ()).throw(ValueError("--flag bad")), ["--flag"]),
        "lost": B.Case("t", "l", lambda e: f.write_text("y"), check=lambda r: None, keep=lambda e: [f]),
        "correct": B.Case("t", "ok", lambda e: 2, check=lambda r: B.assert_(r == 2)),
    }
    for want, case in cases.items():
        assert B.classify(case, env)[0] == want, want
    segv = B.Case("t", "segv", lambda e: B.child("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"), ["x"])
    assert B.classify(segv, env)[0] == "crash"
    two_lines = B.Case("t", "2", lambda e: B.Cli(2, "", "p: error: --x\nmore\n"), ["--x"])
    assert B.classify(two_lines, env)[0] == "unclear"
