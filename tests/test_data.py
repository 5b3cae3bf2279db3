"""effivit.train.data / digits: the embedded digits set, unreadable images, transforms, mixup, samplers."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

from effivit.cli import main  # noqa: E402
from effivit.train import data as D  # noqa: E402
from effivit.train.digits import split_indices, write_digits  # noqa: E402


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    y = load_digits().target
    train, val = split_indices(y, 0.2)
    assert len(train) + len(val) == len(y) == 1797
    assert not set(train) & set(val)
    assert split_indices(y, 0.2) == (train, val)  # fixed, not drawn from global RNG state
    for cls in range(10):
        n_cls = int((y == cls).sum())
        n_val = sum(int(y[i] == cls) for i in val)
        assert n_val == round(0.2 * n_cls), (cls, n_val, n_cls)


def test_data_digits_command_writes_an_image_folder(tmp_path):
    from PIL import Image

    assert main(["data", "digits", str(tmp_path), "--size", "16", "--max-per-class", "2"]) == 0
    for split in ("train", "val"):
        files = sorted((tmp_path / split).glob("*/*.png"))
        assert len(files) == 20
        assert sorted({f.parent.name for f in files}) == [str(c) for c in range(10)]
    with Image.open(files[0]) as img:
        assert img.size == (16, 16) and img.mode == "RGB"
        assert len(set(img.convert("L").tobytes())) > 2  # a real, smoothly upscaled scan, not a blank square
    with pytest.raises(ValueError, match="size"):
        write_digits(tmp_path / "bad", size=4)


def _folder(tmp_path, n_per_class=2):
    write_digits(tmp_path, size=16, max_per_class=n_per_class)
    return tmp_path


def test_unreadable_images_are_skipped_with_a_warning_and_counted(tmp_path):
    root = _folder(tmp_path)
    (root / "train" / "3" / "broken.png").write_bytes(b"not an image at all")
    good = next((root / "train" / "4").glob("*.png")).read_bytes()
    (root / "train" / "4" / "truncated.png").write_bytes(good[: len(good) // 2])
    cfg = D.resolve_data_config({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                 "crop_pct": 1.0, "size_divisor": 16})
    ds = D.ImageFolderDataset(root / "train", D.eval_transform(cfg))
    assert len(ds) == 22
    loader = D.eval_loader(ds, batch_size=8)
    seen, skipped = 0, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in loader:
            D.warn_skipped(batch.skipped, len(skipped))
            skipped += batch.skipped
            seen += len(batch)
    assert seen == 20
    assert sorted(s.path.rsplit("/", 1)[-1] for s in skipped) == ["broken.png", "truncated.png"]
    assert sum("skipped unreadable image" in str(w.message) for w in caught) == 2


def test_eval_transform_follows_the_model_config(tmp_path):
    from PIL import Image

    pcfg = {"input_size": (3, 224, 224), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "crop_pct": 0.5,
            "interpolation": "bilinear", "size_divisor": 32, "architecture": "x"}
    cfg = D.resolve_data_config(pcfg, img_size=64)
    img = Image.new("RGB", (100, 80), (255, 0, 0))
    x = D.eval_transform(cfg)(img)
    assert x.shape == (3, 64, 64)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(pcfg["mean"])) / torch.tensor(pcfg["std"])
    torch.testing.assert_close(x[:, 32, 32], expected)
    with pytest.raises(ValueError, match="multiple of 32"):
        D.resolve_data_config(pcfg, img_size=48)
    with pytest.raises(ValueError, match="only runs at 224"):
        D.resolve_data_config({**pcfg, "fixed_input_size": True}, img_size=256)
    t = D.train_transform(cfg, scale=(0.5, 1.0), hflip=0.5, randaugment=(2, 9))
    assert t(img).shape == (3, 64, 64)


def test_mixup_cutmix_make_soft_targets():
    mix = D.mixup_cutmix(10, mixup=0.8, cutmix=1.0)
    x, y = torch.rand(6, 3, 16, 16), torch.arange(6)
    x2, y2 = mix(x, y)
    assert x2.shape == x.shape and y2.shape == (6, 10)
    torch.testing.assert_close(y2.sum(1), torch.ones(6))
    assert D.mixup_cutmix(10) is None


@pytest.mark.parametrize("n,batch", [(40, 8), (43, 12)])
def test_global_batch_sampler_splits_the_same_global_batches(n, batch):
    """2 processes x 1 micro-step and 1 process x 2 micro-steps see the same samples in each slice."""
    one = D.GlobalBatchSampler(n, batch, world_size=1, rank=0, accum_steps=2, seed=3)
    ranks = [D.GlobalBatchSampler(n, batch, world_size=2, rank=r, accum_steps=1, seed=3) for r in (0, 1)]
    full = D.GlobalBatchSampler(n, batch, seed=3)
    for s in (one, full, *ranks):
        s.set_epoch(5)
    micro, r0, r1, whole = list(one), list(ranks[0]), list(ranks[1]), list(full)
    assert len(whole) == n // batch and len(micro) == 2 * len(whole)
    for k, g in enumerate(whole):
        assert micro[2 * k] == r0[k] and micro[2 * k + 1] == r1[k]
        assert sorted(r0[k] + r1[k]) == sorted(g) and len(set(g)) == batch
    other = D.GlobalBatchSampler(n, batch, seed=3)
    other.set_epoch(6)
    assert list(other) != whole  # a new order every epoch
    with pytest.raises(ValueError, match="multiple"):
        D.GlobalBatchSampler(n, 10, world_size=4)
    with pytest.raises(ValueError, match="larger than the data set"):
        D.GlobalBatchSampler(5, 8)


def test_missing_split_folder_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="effivit data digits"):
        D.find_split(tmp_path, "train")
