import subprocess
import sys

import pytest

from lmcompress.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"run", "eval", "export", "assets", "inspect", "clean"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: lmcompress" in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: smollm2-135m\nstages:\n  - stage: truncate\n    keep: [0, 99]\n    colour: red\n")
    proc = subprocess.run([sys.executable, "-m", "lmcompress.cli", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "stages[0].colour: unknown field" in lines[0]
    assert "Traceback" not in proc.stderr


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmcompress.cli", "--debug", "run", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "recipe file not found" in proc.stderr
