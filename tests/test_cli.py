"""The four command-line tools as a new user meets them: one error convention (one line
``PROG: error: ...``, exit status 2, flags named as flags), and README commands that run as written."""
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from kop_triton import convert, generate, train
from kop_triton import eval as keval

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"train": (train.main, "kop-train"), "eval": (keval.main, "kop-eval"),
         "generate": (generate.main, "kop-generate"), "convert": (convert.main, "kop-convert")}


def _exit_code(main, argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:   # argparse
        return exc.code


def _one_line(capsys, prog) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert "Traceback" not in err and "usage:" not in err, err
    return err


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_bad_flag_is_one_line_and_status_2_in_every_tool(tool, capsys):
    main, prog = TOOLS[tool]
    assert _exit_code(main, ["--no-such-flag"]) == 2
    assert "(see --help)" in _one_line(capsys, prog)


def test_errors_the_tools_find_themselves_have_the_same_form_and_name_flags(tmp_path, capsys):
    missing = tmp_path / "none"
    cases = [
        ("eval", ["--checkpoint", missing, "--text", tmp_path / "none.txt"], "--text file not found"),
        ("generate", ["--checkpoint", missing, "--top-k", "0"], "--top-k must be >= 1, got 0"),
        ("generate", ["--checkpoint", missing, "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        ("generate", ["--checkpoint", missing, "--temperature", "nan"], "--temperature must be a finite number"),
        ("generate", ["--checkpoint", missing], "does not exist"),
        ("convert", [tmp_path / "x.pt", tmp_path / "o", "--tokenizer", "byte", "--gamma-min", "0.05",
                     "--alpha-cap", "1"], "does not exist"),
        ("train", ["--steps", "0", "--out", tmp_path / "o"], "--steps must be >= 1"),
    ]
    for tool, argv, needle in cases:
        main, prog = TOOLS[tool]
        assert _exit_code(main, argv) == 2, (tool, argv)
        err = _one_line(capsys, prog)
        assert needle in err, (tool, err)
        assert "top_k" not in err and "top_p" not in err, err         # flags, not the API's argument names


# ---- the README, followed literally ------------------------------------------------------

def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _readme_commands():
    """(tool, argv) of every ``python -m kop_triton.<tool>`` / ``torchrun -m ...`` line in the README's
    bash blocks (continuation lines joined, comments dropped)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", _readme(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line.strip())
            m = re.search(r"-m kop_triton\.(train|eval|generate|convert)\s+(.*)", line)
            if m:
                cmds.append((m.group(1), shlex.split(m.group(2))))
    return cmds


def test_readme_commands_use_only_flags_the_tools_have(capsys):
    cmds = _readme_commands()
    assert {t for t, _ in cmds} == set(TOOLS), cmds
    helps = {}
    for tool, (main, _) in TOOLS.items():
        assert _exit_code(main, ["--help"]) == 0
        helps[tool] = capsys.readouterr().out
    for tool, argv in cmds:
        for a in argv:
            if a.startswith("--"):
                assert re.search(rf"{re.escape(a.split('=')[0])}\b", helps[tool]), (tool, a, argv)
        if tool == "train":
            train.parse_args(argv)                                        # parses as written


def test_readme_says_which_python_and_where_the_example_files_come_from():
    text = _readme()
    first = text.index("python -m kop_triton.")
    assert ".venv/bin/python" in text[:first] and "source .venv/bin/activate" in text[:first]
    inputs = {a for _, argv in _readme_commands() for a in argv if a.endswith((".pt", "input.txt"))}
    assert inputs >= {"char_shakespeare_v2_rosa_off.pt", "tinyshakespeare/input.txt"}, inputs
    note = text[text.index("Files the examples read"):]
    note = note[:note.index("\n\n")]
    for path in inputs:                                                   # each one says where to get it
        assert f"`{path}`" in note, path
    assert "karpathy/char-rnn" in note and "AileenKoneko/K-language-model" in note


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_what_the_readme_examples_write_is_git_ignored():
    for path in ("ckpt/v2", "ckpt/v2-rosa", "hf/v2", "runs/v2"):
        r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], capture_output=True)
        assert r.returncode == 0, f"{path} is not git-ignored"
