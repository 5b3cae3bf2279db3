"""Run timm's own model test suite (``tests/test_models.py`` of a pytorch-image-models checkout) against
effivit's models: every test runs for each model name effivit shares with timm, with ``timm.create_model``
answered by ``effivit.create_model``.

timm's tests are not part of this repository (they are timm's code); point this script at a checkout:

    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm-src
    python tools/timm_model_suite.py /tmp/timm-src [pytest args, e.g. -k "forward_fx" -x]

The substitution: ``timm.create_model`` / ``timm.list_models`` / ``timm.list_pretrained`` are replaced before
the test module is imported. Listing keeps timm's filters and keeps only names effivit registers. Creation
passes timm's arguments through; ``feature_cls``/``feature_cfg`` (a request for one of timm's feature
wrappers, e.g. its FX one) are dropped: effivit builds the form timm builds by default for the model
(``FeatureList`` or ``FeatureExtractor``), which timm's tests then check. effivit's EfficientViT-MIT joins
timm's list of early-pooling heads, where timm's own
EfficientVit is. Tests of other models (naflexvit, gemma4, regnet) are deselected or fail by design.
"""

from __future__ import annotations

import sys
from pathlib import Path


class EffivitInTimm:
    """A pytest plugin: patches timm before timm's test module is collected."""

    def pytest_configure(self, config) -> None:
        import timm

        import effivit

        ours = set(effivit.list_models())
        list_models, list_pretrained = timm.list_models, timm.list_pretrained

        def keep(names):
            return [n for n in names if n.partition(".")[0] in ours]

        def create_model(model_name, pretrained=False, **kwargs):
            kwargs.pop("feature_cls", None)
            kwargs.pop("feature_cfg", None)
            return effivit.create_model(model_name, pretrained=pretrained, **kwargs)

        self.early_pool = (effivit.models.efficientvit_mit.EfficientViTMit,)
        timm.list_models = lambda *a, **k: keep(list_models(*a, **k))
        timm.list_pretrained = lambda *a, **k: keep(list_pretrained(*a, **k))
        timm.create_model = create_model
        timm.models.create_model = create_model


    def pytest_runtest_setup(self, item) -> None:
        # timm lists the classes whose head pools before its last layers (no unpooled output); effivit's
        # EfficientViT-MIT is the same architecture as timm's EfficientVit listed there.
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "EARLY_POOL_MODELS"):
            if not set(self.early_pool) <= set(module.EARLY_POOL_MODELS):
                module.EARLY_POOL_MODELS = tuple(module.EARLY_POOL_MODELS) + self.early_pool


def main(argv: list[str]) -> int:
    import pytest

    if not argv or not (Path(argv[0]) / "tests" / "test_models.py").is_file():
        print("usage: python tools/timm_model_suite.py PATH_TO_TIMM_CHECKOUT [pytest args]", file=sys.stderr)
        return 2
    root = Path(argv[0])
    args = [str(root / "tests" / "test_models.py"), "-p", "no:cacheprovider", "-q", "--rootdir", str(root),
            "-o", "addopts=", *argv[1:]]
    return pytest.main(args, plugins=[EffivitInTimm()])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
