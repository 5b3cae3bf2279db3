"""Faults: a killed training run resumes with nothing lost, a failed load changes nothing, and the command
line answers bad input with one line and a non-zero exit (never a traceback)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_norm_stats

import effivit
from effivit.checkpoint import CheckpointError
from effivit.train.digits import write_digits

MODEL = "efficientvit_m0"
TRAIN_ARGS = ["--model", MODEL, "--epochs", "3", "--batch-size", "10", "--img-size", "32", "--crop-pct", "1.0",
              "--lr", "3e-3", "--warmup-epochs", "0", "--hflip", "0", "--scale", "1.0", "1.0", "--workers", "0",
              "--no-progress", "--device", "cpu", "--seed", "0", "--ema-decay", "0.9"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _train(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "effivit", "train", "--data", str(data), "--output", str(out), *TRAIN_ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    text = out.decode()
    assert proc.returncode == 0, text
    return text


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, size=32, max_per_class=2)  # 20 train + 20 val real scans: 2 steps per epoch
    return root


def test_training_killed_at_random_points_resumes_with_nothing_lost(digits, tmp_path):
    straight = tmp_path / "straight"
    start = time.monotonic()
    _finish(_train(digits, straight))
    # Kill moments are drawn within the uninterrupted run's own duration (interpreter start, import, build,
    # epochs, checkpoint writes), so kills land on a fast machine and a slow one alike.
    duration = time.monotonic() - start
    reference = torch.load(straight / "last.pt", weights_only=True)

    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    resumed = False
    scale = 1.0  # halved when a run finishes before its first kill (a warm start can beat the cold reference)
    while kills < 4:
        proc = _train(digits, run, *(["--resume", "auto"] if resumed else []))
        # Kill at a random moment: while importing, building, inside an epoch or while a checkpoint is written.
        time.sleep(rng.uniform(0.1, 0.9) * duration * scale)
        if proc.poll() is not None:  # finished before the kill
            _finish(proc)
            if kills or scale < 0.1:
                break
            shutil.rmtree(run)  # nothing was killed yet: start over, killing sooner
            scale /= 2
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        resumed = True
        if (run / "last.pt").exists():  # whatever the moment, the checkpoint on disk is whole
            ckpt = torch.load(run / "last.pt", weights_only=True)
            assert 0 <= ckpt["epoch"] <= 2
    assert kills >= 1, "no kill landed: the test proved nothing"
    _finish(_train(digits, run, "--resume", "auto"))
    final = torch.load(run / "last.pt", weights_only=True)
    assert final["epoch"] == reference["epoch"] == 2
    assert final["global_step"] == reference["global_step"]
    for part in ("model", "ema"):
        for k, v in reference[part].items():
            assert torch.equal(final[part][k], v), f"{part}.{k} differs from the uninterrupted run"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0, 1, 2], "one metrics row per epoch, none lost or doubled"


def test_failed_load_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = randomize_norm_stats(effivit.create_model("levit_128s"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = effivit.create_model("levit_128s").state_dict()
    broken = dict(other)
    broken["stages.2.blocks.0.mlp.ln2.linear.weight"] = torch.zeros(3, 3)  # one key of the wrong shape
    with pytest.raises(CheckpointError, match="shape"):
        effivit.load_checkpoint(model, broken)
    bad_type = {k: (v.to(torch.complex64) if v.is_floating_point() else v) for k, v in other.items()}
    with pytest.raises(CheckpointError, match="convert"):
        effivit.load_checkpoint(model, bad_type)  # complex -> float: fails while converting, before copying
    missing = {k: v for k, v in other.items() if not k.startswith("stages.2")}
    with pytest.raises(CheckpointError, match="missing"):
        effivit.load_checkpoint(model, missing)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"


@pytest.mark.parametrize("argv, message", [
    (["export", "no_such_model", "OUT"], "Unknown model 'no_such_model'"),
    (["export", "levit_128s", "OUT", "--checkpoint", "/no/such/file.pth"], "not found"),
    (["export", "levit_128s", "/proc/no_such_dir/x.onnx"], ""),
    (["train", "--model", "levit_128s", "--data", "/no/such/folder"], "/no/such/folder"),
    (["eval", "--model", "no_such_model", "--data", "/no/such/folder"], ""),
    (["bench", "--models", "no_such_model*"], "no_such_model"),
    (["list", "-v", "no_such*"], "no models match"),
])
def test_cli_bad_input_is_one_line_and_a_nonzero_exit(argv, message, tmp_path):
    argv = [a.replace("OUT", str(tmp_path / "m.onnx")) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "effivit", *argv], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0], lines[0]


def test_cli_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # running as root: permissions do not apply, use a path under a file
        target = tmp_path / "a_file"
        target.write_text("x")
        out = target / "sub" / "m.pt"
    else:
        out = locked / "m.pt"
    proc = subprocess.run([sys.executable, "-m", "effivit", "export", "efficientvit_m0", str(out), "--format",
                           "torchscript", "--img-size", "64"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(out.parent) in lines[0], proc.stderr
