"""The shared learned-attention-bias machinery: layout, strided queries, resampling and a cache that
cannot go stale (train/eval switches, in-place updates, .to(), state_dict round trips)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close

from effivit.layers.attn_bias import (
    AttentionBiasBase,
    gather_attention_bias,
    offset_index,
    query_grid,
    resample_bias_table,
)


def reference_index(res: int, stride: int) -> torch.Tensor:
    """The official LeViT construction: offsets numbered in order of first appearance over (query, key)
    pairs, queries at every ``stride``-th position."""
    k_points = [(i, j) for i in range(res) for j in range(res)]
    q_points = [(i, j) for i in range(0, res, stride) for j in range(0, res, stride)]
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in q_points:
        for p2 in k_points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            if off not in offsets:
                offsets[off] = len(offsets)
            idxs.append(offsets[off])
    return torch.tensor(idxs).view(len(q_points), len(k_points))


@pytest.mark.parametrize("res,stride", [(7, 1), (14, 1), (14, 2), (7, 2), (4, 1)])
def test_offset_index_matches_official_construction(res, stride):
    assert torch.equal(offset_index(res, res, stride), reference_index(res, stride))


def test_offset_index_rectangular_and_query_grid():
    idx = offset_index(3, 5, 2)
    assert idx.shape == (2 * 3, 15) and query_grid(3, 5, 2) == (2, 3)
    # query (1, 2) sits at key (2, 4); key (0, 0) is offset (2, 4) -> 2 * 5 + 4
    assert idx[1 * 3 + 2, 0] == 14
    assert int(idx.max()) < 15


def test_resample_identity_and_shapes():
    table = torch.randn(3, 49)
    assert resample_bias_table(table, (7, 7), (7, 7)) is table
    out = resample_bias_table(table, (7, 7), (9, 5))
    assert out.shape == (3, 45)
    # A constant table stays constant under bicubic resampling (the weights sum to one).
    const = torch.full((2, 49), 0.7)
    assert_close(resample_bias_table(const, (7, 7), (12, 12)), torch.full((2, 144), 0.7), 1e-6, "constant")


def test_gather_at_trained_grid_is_plain_indexing():
    table = torch.randn(4, 14 * 14)
    bias = gather_attention_bias(table, (14, 14), 14, 14, 2)
    assert torch.equal(bias, table[:, reference_index(14, 2)])


class Toy(AttentionBiasBase):
    def __init__(self) -> None:
        super().__init__()
        self.init_attention_bias(2, (4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_bias(x.shape[-2], x.shape[-1])


def _toy() -> Toy:
    m = Toy()
    with torch.no_grad():
        m.attention_biases.normal_()
    return m


def test_cache_is_used_and_never_stale():
    m = _toy().eval()
    x = torch.zeros(1, 1, 4, 4)
    with torch.no_grad():
        b1 = m(x)
        assert b1 is m(x), "eval without autograd should reuse the cached tensor"
        # In-place update in eval mode (EMA, optimizer with the model in eval): the cache follows.
        m.attention_biases.mul_(2)
        assert_close(m(x), 2 * b1, 0.0, "after in-place update")
        # load_state_dict while in eval mode.
        sd = {k: v * 0 + 3 for k, v in m.state_dict().items()}
        m.load_state_dict(sd)
        assert torch.all(m(x) == 3)
    # Train/eval switches: training gathers fresh (with gradients), eval caches again.
    m.train()
    out = m(x)
    assert out.requires_grad
    out.sum().backward()
    assert m.attention_biases.grad is not None and m.attention_biases.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        assert torch.all(m(x) == 3)
    # Eval with autograd on still gathers fresh, so gradients reach the table.
    assert m(x).requires_grad


def test_cache_follows_dtype_and_copies():
    m = _toy().eval()
    x = torch.zeros(1, 1, 4, 4)
    with torch.no_grad():
        ref = m(x).clone()
        m.double()
        out = m(x)
        assert out.dtype == torch.float64
        assert_close(out.float(), ref, 1e-7, "after .double()")
        c = copy.deepcopy(m)
        c.attention_biases.add_(1)
        assert_close(c(x).float(), ref + 1, 1e-6, "deep copy is independent")
        assert_close(m(x).float(), ref, 1e-7, "original unchanged")


def test_state_dict_has_no_cache():
    m = _toy().eval()
    with torch.no_grad():
        m(torch.zeros(1, 1, 4, 4))
    assert set(m.state_dict()) == {"attention_biases"}


def test_other_grids_resample_and_cache_switches():
    m = _toy().eval()
    with torch.no_grad():
        at4 = m(torch.zeros(1, 1, 4, 4)).clone()
        at6 = m(torch.zeros(1, 1, 6, 6))
        assert at6.shape == (2, 36, 36)
        expected = gather_attention_bias(m.attention_biases, (4, 4), 6, 6)
        assert_close(at6, expected, 0.0, "resampled")
        assert_close(m(torch.zeros(1, 1, 4, 4)), at4, 0.0, "back at the trained grid")


def test_bad_arguments_raise():
    m = AttentionBiasBase()
    with pytest.raises(ValueError, match="num_heads"):
        m.init_attention_bias(0, 7)
    with pytest.raises(ValueError, match="stride"):
        m.init_attention_bias(2, 7, stride=0)


def test_torchscript_uses_cache_and_computes_off_grid():
    m = _toy().eval()
    with torch.no_grad():
        m.build_bias_cache(4, 4)
        scripted = torch.jit.script(m)
        assert_close(scripted(torch.zeros(1, 1, 4, 4)), m(torch.zeros(1, 1, 4, 4)), 0.0, "scripted")
        assert_close(scripted(torch.zeros(1, 1, 5, 3)), m(torch.zeros(1, 1, 5, 3)), 1e-6, "scripted off-grid")


# ---- helpers shared by the family tests (test_levit.py, test_efficientformer*.py) ----------------------


def randomize_attention_biases(model: torch.nn.Module, std: float = 0.5, seed: int = 1) -> torch.nn.Module:
    """The references initialise the bias tables to zero; random tables make the bias layout testable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def timm_pair(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, timm's) with the same random weights, random BN statistics and random attention biases."""
    timm = pytest.importorskip("timm")
    from conftest import randomize_norm_stats, scale_classifier

    import effivit

    torch.manual_seed(seed)
    ref = timm.create_model(name, pretrained=False).eval()
    randomize_norm_stats(ref, seed)
    scale_classifier(ref, seed=seed)
    randomize_attention_biases(ref, seed=seed + 1)
    ours = effivit.create_model(name).eval()
    effivit.load_checkpoint(ours, ref.state_dict())
    return ours, ref


def check_bias_parity(ours: torch.nn.Module, ref: torch.nn.Module, img_size: int = 224, batch: int = 1) -> None:
    """Our fp32 logits against timm's float64 logits, with random bias tables.

    (timm's own fp32 logits are ~1e-3 away from its float64 ones for some of these random weights: its
    attention adds the bias after rounding the scaled logits. Ours stay within 1e-4 of the exact result.)
    """
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(3))
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        exact = ref64(x.double()).float()
        got = ours(x)
    assert exact.abs().max() > 1e-3
    assert_close(got, exact, 1e-4, "fp32 logits vs timm float64 (random attention biases)")


def count_calls(monkeypatch, module, fn_name: str) -> list[int]:
    """Count calls of a module-level function (to prove fused models do no bias indexing)."""
    calls = [0]
    original = getattr(module, fn_name)

    def wrapped(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, fn_name, wrapped)
    return calls


def check_deploy(ours: torch.nn.Module, name: str, monkeypatch, sizes=(224, 256, 384)) -> torch.nn.Module:
    """What ``deploy.fuse`` must give for a bias-family model: no BatchNorm left, one head, fused == unfused
    at the trained size and at other sizes, cached biases as plain tensors, and no bias indexing or
    resampling at run time once ``set_input_size`` has prepared a size."""
    import effivit.layers.attn_bias as ab
    from effivit.deploy import count_batchnorms, fuse

    fused = fuse(ours)
    assert count_batchnorms(fused) == 0, f"{name}: BatchNorm left after fuse"
    assert fused.merged_heads and isinstance(fused.head, torch.nn.Linear)
    attn = [m for m in fused.modules() if isinstance(m, AttentionBiasBase)]
    assert attn, f"{name}: no attention-bias modules"
    for m in attn:
        assert m.attention_bias_cache.dim() == 3 and not m.attention_bias_cache.requires_grad
        assert type(m.attention_bias_cache) is torch.Tensor
    for s in sizes:
        x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(s))
        fused.set_input_size(s)
        calls = count_calls(monkeypatch, ab, "offset_index")
        with torch.no_grad():
            y = ours(x)  # the unfused model gathers (and off 224, resamples) on its own
            calls[0] = 0
            yf = fused(x)
        assert calls[0] == 0, f"{name}: the fused model indexed the bias table at run time ({s}px)"
        assert torch.isfinite(y).all()
        assert_close(yf, y, 1e-4 * max(1.0, float(y.abs().max())), f"{name} fused vs unfused at {s}px")
        monkeypatch.undo()
    return fused


def assert_caches_fresh(model: torch.nn.Module, what: str) -> None:
    """Every bias cache a forward left equals the bias computed now from the current parameters."""
    n = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, AttentionBiasBase) and m.bias_cache_grid[0] > 0:
                fresh = m.compute_attention_bias(*m.bias_cache_grid)
                assert m.attention_bias_cache.dtype == fresh.dtype, f"{what}: {name} cache dtype"
                assert_close(m.attention_bias_cache, fresh, 0.0, f"{what}: {name} cache is stale")
                n += 1
    assert n > 0, f"{what}: no cache was built"


def check_cache_round_trips(name: str, ours: torch.nn.Module, fused: torch.nn.Module) -> None:
    """Caches follow train/eval switches, dtype moves and state_dict round trips (unfused and fused)."""
    import effivit
    from effivit.deploy import fuse

    # A small input keeps this quick; its grid is not the trained one, so the caches hold resampled biases.
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = ours(x)
        yf = fused(x)
        # Fused -> state_dict -> a fused copy of a fresh model (whose caches hold its own zero tables).
        fresh = fuse(effivit.create_model(name).eval())
        fresh(x)
        fresh.load_state_dict(fused.state_dict())
        assert_close(fresh(x), yf, 0.0, "fused state_dict round trip")
        # Unfused: caches built (eval forward), then other weights loaded in eval mode.
        other = effivit.create_model(name).eval()
        other(x)
        other.load_state_dict(ours.state_dict())
        assert_close(other(x), y, 0.0, "state_dict loaded after eval()")
        # In-place update of a bias table while in eval mode (EMA-style) is seen at once.
        tables = [p for n, p in other.named_parameters() if n.endswith("attention_biases")]
        g = torch.Generator().manual_seed(8)
        saved = [t.clone() for t in tables]
        for t in tables:
            t.add_(torch.randn(t.shape, generator=g))
        other(x)
        assert_caches_fresh(other, "after an in-place bias update in eval mode")
        for t, orig in zip(tables, saved):
            t.copy_(orig)
        assert_close(other(x), y, 1e-5, "after undoing the update")
    # Train/eval: a training step changes weights; eval afterwards must use the new ones.
    other.train()
    out = other(torch.cat([x, x.flip(-1)]))  # batch 2: BatchNorm1d heads need more than one sample
    loss = out[0].sum() if isinstance(out, tuple) else out.sum()
    loss.backward()
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n.endswith("attention_biases"):
                p.add_(torch.randn_like(p))
    other.eval()
    check = copy.deepcopy(other)
    for m in check.modules():
        if isinstance(m, AttentionBiasBase):
            m._bias_stamp = None  # a copy whose caches are certainly rebuilt
    with torch.no_grad():
        assert_close(other(x), check(x), 0.0, "eval after training steps")
        assert_caches_fresh(other, "eval after training steps")
        # dtype moves rebuild the cache in the new dtype.
        d = copy.deepcopy(ours).double()
        assert_close(d(x.double()).float(), y, 1e-4, "after .double()")
        assert_caches_fresh(d, "after .double()")
        fused(x)
        assert_caches_fresh(fused, "fused")
