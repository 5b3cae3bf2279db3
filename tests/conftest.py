"""Shared test helpers: timm is the oracle (dev dependency only), weights are random and copied across."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import effivit


@pytest.fixture(autouse=True)
def _fresh_torch_compile_state():
    """Each test compiles from a clean slate. Every model shares ``Backbone.forward``, so dynamo's per-code
    cache (8 entries) would otherwise fill with earlier tests' models and refuse a later ``fullgraph`` compile,
    and compiled code of long-gone models would stay alive for the whole session."""
    yield
    if torch._dynamo.utils.counters["frames"]["total"]:  # noqa: SLF001 - only when something was compiled
        torch._dynamo.reset()  # noqa: SLF001


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folds are really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
    return model


def scale_classifier(model: nn.Module, std: float = 1.0, seed: int = 0) -> nn.Module:
    """Re-draw 2-D weights (linear layers) with a larger std so logits are O(1) and a 1e-4 tolerance means
    something (timm-style init gives tiny logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std / m.weight.shape[1] ** 0.5)
    return model


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4, what: str = "") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


def compare_with_timm(name: str, img_size: int | tuple[int, int] = 224, batch: int = 2, atol: float = 1e-4,
                      timm_name: str | None = None, seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    """Build timm's model and ours, copy timm's (randomised) weights into ours with load_checkpoint,
    and check the logits match within ``atol`` (fp32). Returns (ours, timm's)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    ref = timm.create_model(timm_name or name, pretrained=False, **kwargs).eval()
    randomize_norm_stats(ref, seed)
    scale_classifier(ref, seed=seed)  # heads may be zero-initialised; make every logit depend on the weights
    ours = effivit.create_model(name).eval()
    effivit.load_checkpoint(ours, ref.state_dict())
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    assert_close(got, expected, atol, f"{name} vs timm")
    assert expected.abs().max() > 1e-3, "logits are too small for the comparison to mean anything"
    return ours, ref
