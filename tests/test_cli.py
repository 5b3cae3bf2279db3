"""The command line: `effivit list`, `effivit export`, and `--help` of every sub-command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from effivit.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public accessor
    assert {"list", "export", "bench"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: effivit " + name in capsys.readouterr().out


def test_list(capsys):
    assert main(["list", "nextvit*"]) == 0
    assert capsys.readouterr().out.split() == ["nextvit_base", "nextvit_large", "nextvit_small"]
    assert main(["list", "-v", "--pretrained", "nextvit_small*"]) == 0
    out = capsys.readouterr().out
    assert "nextvit_small.bd_in1k_384" in out and "384x384" in out and "top1=83.60" in out
    assert main(["list", "no_such*"]) == 1


def test_export_torchscript_and_errors(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", "nextvit_small", str(out), "--format", "torchscript", "--img-size", "64"]) == 0
    assert "verified" in capsys.readouterr().out
    scripted = torch.jit.load(str(out))
    assert scripted(torch.randn(1, 3, 64, 96)).shape == (1, 1000)
    assert main(["export", "nextvit_smal", str(tmp_path / "x.pt")]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_export_onnx_from_the_console_script(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "effivit", "export", "nextvit_small", str(out), "--attn", "xca", "--img-size", "64", "96"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: torch.randn(2, 3, 64, 96).numpy()})
    assert y.shape == (2, 1000)
