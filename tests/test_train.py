"""effivit.train.loop end to end on a few real digit images: learning, checkpoints, resume, distillation, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

import effivit  # noqa: E402
from effivit.train.digits import write_digits  # noqa: E402
from effivit.train.loop import SimulatedCrash, TrainConfig, train  # noqa: E402

# Smallest first; the first registered one is used (the loop is model-agnostic).
TINY_MODELS = ("efficientvit_b0", "convnextv2_atto", "efficientvit_m0", "repvit_m0_9", "levit_128s", "nextvit_small")
IMG = 32


def _tiny_model() -> str:
    names = set(effivit.list_models())
    return next(n for n in TINY_MODELS if n in names)


def _distill_head_model() -> str | None:
    from effivit.registry import get_entry

    for name in ("levit_128s", "efficientformerv2_s0", "levit_128"):
        if name in effivit.list_models() and get_entry(name).defaults.has_distill_head:
            return name
    return None


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, size=IMG, max_per_class=2)  # 20 train + 20 val real scans
    return root


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=_tiny_model(), data=str(data), output=str(out), epochs=2, batch_size=10, img_size=IMG,
                crop_pct=1.0, lr=3e-3, warmup_epochs=0.0, smoothing=0.0, hflip=0.0, scale=(1.0, 1.0),
                randaugment=None, workers=0, progress=False, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_unreadable_images_are_counted(digits, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(digits / "val", data / "val")
    (data / "train").mkdir()
    for cls_dir in (digits / "train").iterdir():
        os.symlink(cls_dir, data / "train" / cls_dir.name)
    (data / "train" / "x").mkdir()  # an extra class folder holding only a corrupt file
    (data / "train" / "x" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(_cfg(data, out, epochs=4, batch_size=7, plot=True))
    rows = _rows(out)
    assert len(rows) == 4
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"], [r["train_loss"] for r in rows]
    assert sum(r["train_skipped"] for r in rows) >= 1  # 21 files, 3 steps of 7: the corrupt one is drawn
    assert any("corrupt.png" in str(w.message) for w in caught)
    assert result["final"]["epoch"] == 3
    assert (out / "curves.png").stat().st_size > 1000
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "val_top1", "val_top5", "throughput", "lr"} <= set(header)


def test_checkpoints_load_weights_only_and_resume_reproduces_an_uninterrupted_run(digits, tmp_path):
    kw = dict(epochs=2, batch_size=10, ema_decay=0.9, randaugment=(2, 9), scale=(0.5, 1.0), mixup=0.5,
              workers=1, clip_grad=1.0)
    straight = tmp_path / "straight"
    train(_cfg(digits, straight, **kw))
    crashed = tmp_path / "crashed"
    with pytest.raises(SimulatedCrash):
        train(_cfg(digits, crashed, crash_after_steps=3, **kw))  # 2 steps per epoch: dies inside epoch 2
    partial = torch.load(crashed / "last.pt", weights_only=True)
    assert partial["epoch"] == 0 and len(_rows(crashed)) == 1
    train(_cfg(digits, crashed, resume="auto", **kw))

    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(crashed / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"] == 4
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for ka, kb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(ka["exp_avg_sq"], kb["exp_avg_sq"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    assert [r["train_loss"] for r in _rows(straight)] == [r["train_loss"] for r in _rows(crashed)]
    # The weights load into a fresh model through the public loader (EMA not preferred: plain "model" key).
    model = effivit.create_model(_tiny_model(), num_classes=10)
    effivit.load_checkpoint(model, straight / "last.pt")
    assert torch.equal(next(iter(model.state_dict().values())), next(iter(a["model"].values())))


def test_fine_tuning_replaces_a_head_of_another_size(digits, tmp_path):
    src = effivit.create_model(_tiny_model(), num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "imagenet.pth")
    out = tmp_path / "ft"
    train(_cfg(digits, out, epochs=1, pretrained=str(tmp_path / "imagenet.pth"), lr=1e-9, min_lr=0.0))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    head = effivit.create_model(_tiny_model(), num_classes=10).pretrained_cfg["classifier"]
    head = (head,) if isinstance(head, str) else head
    backbone = [k for k in ckpt["model"] if not any(k.startswith(h + ".") for h in head)
                and ckpt["model"][k].is_floating_point() and "running" not in k]
    assert backbone
    for k in backbone:  # lr ~ 0: the backbone is the source's
        torch.testing.assert_close(ckpt["model"][k], src.state_dict()[k], atol=1e-6, rtol=0)
    assert ckpt["num_classes"] == 10


@pytest.mark.parametrize("student", ["plain", "distill_head"])
def test_distillation_term_is_used(digits, tmp_path, student):
    name = _tiny_model() if student == "plain" else _distill_head_model()
    if name is None:
        pytest.skip("no registered model declares a distillation head")
    teacher = effivit.create_model(_tiny_model(), num_classes=10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    results = {}
    for alpha in (0.0, 1.0):
        out = tmp_path / f"a{alpha}"
        train(_cfg(digits, out, model=name, epochs=1, teacher=_tiny_model(), distill="hard", distill_alpha=alpha,
                   teacher_checkpoint=str(tmp_path / "teacher.pth")))
        row = _rows(out)[0]
        results[alpha] = (row, torch.load(out / "last.pt", weights_only=True)["model"])
    row0, w0 = results[0.0]
    row1, w1 = results[1.0]
    assert row0["train_loss"] == pytest.approx(row0["train_ce"])
    assert row1["train_loss"] == pytest.approx(row1["train_distill"])
    assert row1["train_distill"] != pytest.approx(row1["train_ce"])
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _step_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "steps.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    data = tmp_path / "data"
    write_digits(data, size=IMG, max_per_class=3)  # 30 train images: 3 steps of 8 per epoch
    common = ["-m", "effivit", "train", "--model", _tiny_model(), "--data", str(data), "--epochs", "2",
              "--batch-size", "8", "--img-size", str(IMG), "--crop-pct", "1", "--randaugment", "0", "0",
              "--scale", "1", "1", "--hflip", "0", "--drop-path", "0", "--workers", "0", "--no-progress",
              "--device", "cpu", "--log-interval", "1", "--lr", "2e-3", "--warmup-epochs", "0"]
    # BatchNorm sees 4 images per process; the single process sees the same 4-image micro-batches.
    _run([sys.executable, *common, "--accum-steps", "2", "--output", str(tmp_path / "one")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
          "--output", str(tmp_path / "two")])
    one, two = _step_losses(tmp_path / "one"), _step_losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-4, (one, two)
    assert one[-1] != pytest.approx(one[0])  # training moved the weights, so later steps test the sync
    w1 = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert len(w2["rng"]) == 2 and json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    for k, v in w1["model"].items():
        if v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(w2["model"][k], v, atol=1e-4, rtol=0, msg=k)


def test_bf16_autocast_channels_last_and_accumulation_run(digits, tmp_path):
    out = tmp_path / "bf16"
    result = train(_cfg(digits, out, epochs=1, amp="bf16", channels_last=True, accum_steps=2, drop_path=0.1))
    row = result["final"]
    assert torch.isfinite(torch.tensor([row["train_loss"], row["val_loss"]])).all()
    assert 0.0 <= row["val_top1"] <= row["val_top5"] <= 100.0
    with pytest.raises(ValueError, match="needs CUDA"):
        train(_cfg(digits, tmp_path / "fp16", epochs=1, amp="fp16"))
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(digits, out, epochs=1))
