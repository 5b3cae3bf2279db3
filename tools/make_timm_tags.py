"""Write ``src/effivit/data/timm_tags.csv``: every released weight timm knows for effivit's architectures.

One row per ``arch.tag`` in timm's order (the first is the default), with the facts a config needs: hub id,
classes, input sizes, pooled size, crop, interpolation, normalisation. The registry reads it for tags,
default tags and configs; ``published.csv`` adds the papers' figures where a weight has them.
Run it after adding a family (timm is a dev dependency):

    python tools/make_timm_tags.py
"""

from __future__ import annotations

import csv
from pathlib import Path

FIELDS = ("model", "hf_hub_id", "num_classes", "input_size", "test_input_size", "pool_size", "crop_pct",
          "crop_mode", "interpolation", "mean", "std")


def _size(value) -> str:
    return "x".join(str(v) for v in value[-2:]) if value else ""


def _floats(value) -> str:
    return " ".join(repr(float(v)) for v in value) if value else ""


def main() -> None:
    import timm
    from timm.models import get_pretrained_cfg

    import effivit

    rows = []
    for arch in effivit.list_models():
        if arch not in timm.list_models(arch):
            continue
        cfgs = timm.models._registry._model_default_cfgs[arch]  # noqa: SLF001 - timm's tag order
        for tag in cfgs.tags:
            if not tag:
                continue
            c = get_pretrained_cfg(f"{arch}.{tag}").to_dict()
            rows.append(dict(
                model=f"{arch}.{tag}", hf_hub_id=c.get("hf_hub_id") or "", num_classes=c.get("num_classes", 1000),
                input_size=_size(c.get("input_size")), test_input_size=_size(c.get("test_input_size")),
                pool_size=_size(c.get("pool_size")), crop_pct=c.get("crop_pct", ""), crop_mode=c.get("crop_mode", ""),
                interpolation=c.get("interpolation", ""), mean=_floats(c.get("mean")), std=_floats(c.get("std")),
            ))
    out = Path(__file__).resolve().parents[1] / "src" / "effivit" / "data" / "timm_tags.csv"
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, FIELDS, lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} weights to {out}")


if __name__ == "__main__":
    main()
