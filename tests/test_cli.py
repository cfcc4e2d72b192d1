import json
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


def test_env_prints_versions_device_and_kernels(capsys):
    import torch

    from lmcompress.cli import main as cli_main

    assert cli_main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["libraries"]["torch"] == torch.__version__ and info["libraries"]["transformers"]
    assert "deepspeed" in info["libraries"]  # its version, or None where it is not installed (it is optional)
    assert info["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert "auto" in info["kernel_options"] and "fbgemm-int8" in info["kernel_options"]
    assert cli_main(["env"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("lmcompress ") and "\ndevice: " in text and "integer CPU kernels: " in text
