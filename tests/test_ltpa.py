"""The ltpa head (Learn to Pay Attention, Jetley et al. 2018): registration, shapes, the exact
contribution↔logit identity over stages of any grid, the init (uniform attention, ≈ prior), gradients,
multi-stage wiring through create_model, bf16 autocast, learning a sparse witness, and bad options.
CPU, random weights, small images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import GaplessError
from pipeline.models import HEADS, LtpaHead, create_head, create_model, head_catalog
from pipeline.models.ltpa import sum_pool_to

BACKBONE = "resnet10t"
K = 3


def _randomise_attention(head: LtpaHead, scale: float = 1.0) -> None:
    """Make the attention non-uniform (it starts exactly uniform)."""
    with torch.no_grad():
        if head.compatibility == "parametrised":
            head.u.normal_(std=scale / math.sqrt(head.dim))
        else:
            head.gamma.uniform_(5.0 * scale, 10.0 * scale)


def _identity_gap(out, head: LtpaHead) -> float:
    return (out.contribution.sum(dim=(2, 3)) + head.fc.bias.to(out.logits.dtype) - out.logits).abs().max().item()


def test_registered_between_attnpool_and_saol() -> None:
    assert HEADS["ltpa"] is LtpaHead and not LtpaHead.scores_are_log_probs
    info = LtpaHead.info()
    assert (info.name, info.label, info.order, info.baseline) == ("ltpa", "LTPA", 35, False)
    assert info.description and "\n" not in info.description
    order = list(head_catalog())
    assert order.index("attnpool") < order.index("ltpa") < order.index("saol")


@pytest.mark.parametrize("kwargs", [{}, {"compatibility": "dot"}, {"dim": 16}, {"attention_stages": 1}])
def test_bare_head_attends_over_the_final_map(kwargs: dict) -> None:
    head = create_head("ltpa", 64, K, **kwargs)
    assert head.feature_stages == 1  # no stage_channels: the final map only, whatever attention_stages is
    _randomise_attention(head)
    out = head(torch.randn(2, 64, 5, 7))
    assert out.logits.shape == (2, K) and out.contribution.shape == (2, K, 5, 7)
    assert out.attention.shape == (2, 1, 5, 7) and not out.scores_are_log_probs
    torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(2, 1))
    assert out.attention.std() > 0 and _identity_gap(out, head) < 1e-5


def _reference_logits(head: LtpaHead, maps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The paper's formulas written out: logits = b + W [Σ_i a_i^s l̂_i^s]_s, a^s = softmax_i c_i^s."""
    local = [p(m).flatten(2) for p, m in zip(head.project, maps)]
    g = local[-1].mean(dim=2)
    attended, attention = [], []
    for s, m in enumerate(local):
        if head.compatibility == "parametrised":
            c = ((m + g.unsqueeze(2)) * head.u[s].view(1, -1, 1)).sum(dim=1)
        else:
            c = head.gamma[s] * (m * g.unsqueeze(2)).sum(dim=1) / math.sqrt(head.dim)
        a = c.softmax(dim=1)
        attention.append(a)
        attended.append((a.unsqueeze(1) * m).sum(dim=2))
    return head.fc(torch.cat(attended, dim=1)), attention


@pytest.mark.parametrize("compatibility", ["parametrised", "dot"])
def test_contribution_sums_to_logits_minus_bias_exactly(compatibility: str) -> None:
    torch.manual_seed(0)
    # three stages whose grids are not multiples of the final 5×7 (19×27 → 5×7, 10×13 → 5×7), and a
    # projection on every stage (dim 16 ≠ 24, 32, 64)
    head = create_head("ltpa", 64, K, stage_channels=(8, 24, 32), attention_stages=3, dim=16,
                       compatibility=compatibility).double()
    assert head.feature_stages == 3 and head.stage_channels == (24, 32)
    _randomise_attention(head)
    features = torch.randn(2, 64, 5, 7, dtype=torch.float64)
    stages = [torch.randn(2, 8, 38, 54, dtype=torch.float64), torch.randn(2, 24, 19, 27, dtype=torch.float64),
              torch.randn(2, 32, 10, 13, dtype=torch.float64)]
    out = head(features, {"stages": stages})
    assert out.logits.dtype == out.contribution.dtype == torch.float64
    summed = out.contribution.sum(dim=(2, 3)) + head.fc.bias
    torch.testing.assert_close(summed, out.logits, rtol=0, atol=1e-12)
    logits, attention = _reference_logits(head, [*stages[1:], features])
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.attention.flatten(1), attention[-1], rtol=0, atol=1e-12)
    assert all(a.amax() * a.shape[1] > 1.5 for a in attention)  # not the uniform special case


def test_sum_pooling_sends_each_cell_to_exactly_one_cell() -> None:
    x = torch.rand(2, K, 5, 7, dtype=torch.float64)
    pooled = sum_pool_to(x, (3, 4))
    torch.testing.assert_close(pooled.sum(dim=(2, 3)), x.sum(dim=(2, 3)), rtol=0, atol=1e-12)
    for r, c in [(0, 0), (2, 3), (4, 6), (3, 1)]:
        one = torch.zeros(1, 1, 5, 7, dtype=torch.float64)
        one[..., r, c] = 1.0
        hit = sum_pool_to(one, (3, 4))
        assert hit.sum() == 1.0 and hit[0, 0, r * 3 // 5, c * 4 // 7] == 1.0
    even = torch.rand(2, K, 6, 8)
    torch.testing.assert_close(sum_pool_to(even, (3, 4)), 4 * F.avg_pool2d(even, 2))  # 2×: 2×2 sum pooling
    assert sum_pool_to(even, (6, 8)) is even


def test_a_fine_witness_lands_in_its_coarse_cell() -> None:
    torch.manual_seed(0)
    head = create_head("ltpa", 64, K, stage_channels=(32,), attention_stages=2, dim=16).double()
    projection = head.project[0].weight[:, :, 0, 0]  # D×32
    with torch.no_grad():
        head.u[0] = 10.0 * projection[:, 0]  # the earlier stage attends to channel 0
    features = torch.zeros(1, 64, 5, 7, dtype=torch.float64)  # the final stage contributes nothing
    stage = torch.zeros(1, 32, 10, 14, dtype=torch.float64)
    stage[0, 0, 7, 3] = 50.0
    out = head(features, {"stages": [stage]})
    expected = torch.zeros_like(out.contribution)
    expected[0, :, 3, 1] = head.fc.weight[:, :16].double() @ (projection @ stage[0, :, 7, 3])
    torch.testing.assert_close(out.contribution, expected, rtol=1e-9, atol=1e-9)
    assert (out.attention == 1 / 35).all()  # the final stage's attention: its features are all alike


@pytest.mark.parametrize("compatibility", ["parametrised", "dot"])
def test_starts_uniform_and_at_the_prior(compatibility: str) -> None:
    prior = torch.tensor([0.8, 0.15, 0.05])
    torch.manual_seed(0)
    model = create_model(BACKBONE, "ltpa", num_classes=K, class_prior=prior.tolist(), compatibility=compatibility)
    out = model(torch.randn(2, 3, 64, 96))
    torch.testing.assert_close(out.attention, torch.full((2, 1, 2, 3), 1 / 6), rtol=0, atol=1e-7)
    assert (out.logits.softmax(dim=1) - prior).abs().max() < 0.05
    # uniform attention: the head starts as GAP + linear on the concatenated (projected) stage means
    with torch.no_grad():
        features, extra = model.forward_features(torch.randn(2, 3, 64, 96))
        out = model.head(features, extra)
        means = [p(m).mean(dim=(2, 3)) for p, m in zip(model.head.project, [*extra["stages"], features])]
    torch.testing.assert_close(out.logits, model.head.fc(torch.cat(means, dim=1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compatibility", ["parametrised", "dot"])
def test_gradients_reach_the_backbone_and_every_head_parameter(compatibility: str) -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONE, "ltpa", num_classes=K, compatibility=compatibility, dim=128)
    out = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(out.logits, torch.tensor([0, 2])).backward()
    first = model.backbone.conv1[0].weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0
    # every parameter takes part (DistributedDataParallel runs without find_unused_parameters), and the
    # attention learns from the first step although it starts uniform
    for name, p in model.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    attention_grad = model.head.u.grad if compatibility == "parametrised" else model.head.gamma.grad
    assert (attention_grad.abs().flatten(1).sum(dim=1) if attention_grad.ndim > 1 else attention_grad.abs()).min() > 0


@pytest.mark.parametrize(("backbone", "n", "indices", "channels"), [
    ("resnet10t", 1, [], ()),
    ("resnet10t", 2, [3], (256,)),
    ("resnet10t", 3, [2, 3], (128, 256)),
    ("resnet18", 2, [3], (256,)),
])
def test_attends_over_the_deepest_stages_of_a_resnet(backbone: str, n: int, indices: list, channels: tuple) -> None:
    torch.manual_seed(0)
    model = create_model(backbone, "ltpa", num_classes=K, attention_stages=n, pretrained=False)
    assert model.head.feature_stages == n and model.stage_indices == indices
    assert model.head.stage_channels == channels and model.head.dim == 512
    assert [type(p).__name__ for p in model.head.project] == ["Conv2d"] * (n - 1) + ["Identity"]
    _randomise_attention(model.head)
    for height, width in [(64, 64), (64, 96)]:
        out = model(torch.randn(2, 3, height, width))
        assert out.logits.shape == (2, K) and out.contribution.shape == (2, K, height // 32, width // 32)
        assert out.attention.shape == (2, 1, height // 32, width // 32)
        assert _identity_gap(out, model.head) < 1e-5


def test_default_is_two_stages_and_other_backbones_work() -> None:
    assert create_model(BACKBONE, "ltpa", num_classes=K).head.feature_stages == 2
    model = create_model("efficientnet_b0", "ltpa", num_classes=K, attention_stages=3)
    assert model.head.feature_stages == 3
    out = model(torch.randn(2, 3, 64, 96))
    assert out.contribution.shape == (2, K, 2, 3) and _identity_gap(out, model.head) < 1e-5


def test_stays_float32_and_exact_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONE, "ltpa", num_classes=K, attention_stages=3)
    _randomise_attention(model.head)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.dtype == out.contribution.dtype == out.attention.dtype == torch.float32
    torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(2, 1))
    assert _identity_gap(out, model.head) < 1e-5


C, GRID = 16, 6


def _witness_batch(n: int, gen: torch.Generator, strength: float = 5.0):
    """Noise feature maps; a positive has ``strength`` along channel 0 at one random position of 36."""
    x = torch.randn(n, C, GRID * GRID, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    where = torch.randint(0, GRID * GRID, (n,), generator=gen)
    positive = y.nonzero().squeeze(1)
    x[positive, 0, where[positive]] += strength
    return x.view(n, C, GRID, GRID), y, where


def _train_on_witnesses(learn_attention: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    head = create_head("ltpa", C, 2, attention_stages=1)
    head.u.requires_grad_(learn_attention)
    optimiser = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=0.05)
    for _ in range(100):
        x, y, _ = _witness_batch(64, gen)
        loss = F.cross_entropy(head(x).logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    x, y, where = _witness_batch(1000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = head(x)
    accuracy = (out.logits.argmax(dim=1) == y).float().mean().item()
    on_witness = out.attention.flatten(1)[torch.arange(len(y)), where][y == 1].mean().item()
    return accuracy, on_witness


@pytest.fixture
def one_thread():
    """Tiny ops: one thread is 20× faster than two on a loaded 2-core machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_learns_a_sparse_witness_that_average_pooling_dilutes(one_thread) -> None:
    """One position in 36 carries the label: the mean dilutes it to a d′ of ~0.8 (≈ 66 % accuracy, the
    same head with its attention frozen uniform), the learned attention finds it."""
    accuracy, on_witness = _train_on_witnesses(learn_attention=True)
    uniform_accuracy, uniform_on_witness = _train_on_witnesses(learn_attention=False)
    assert uniform_on_witness == pytest.approx(1 / 36) and uniform_accuracy < 0.75
    assert accuracy > 0.9, accuracy
    assert on_witness > 0.5, on_witness  # most of a positive's attention on its witness (uniform: 0.028)


def test_bad_options_are_clear_errors() -> None:
    for kwargs, match in [
        ({"attention_stages": 0}, "attention_stages is 0"),
        ({"attention_stages": "2"}, "attention_stages is '2'"),
        ({"compatibility": "cosine"}, "unknown compatibility 'cosine'.*parametrised.*dot"),
        ({"dim": 0}, "dim is 0"),
        ({"stage_channels": (0, 64)}, "stage_channels"),
    ]:
        with pytest.raises(GaplessError, match=match) as err:
            create_head("ltpa", 64, K, **kwargs)
        assert err.value.fix and str(err.value).startswith("ltpa head: ")
    with pytest.raises(TypeError, match="fuse_stages"):  # saol's option is not ltpa's
        create_head("ltpa", 64, K, fuse_stages=2)
    with pytest.raises(GaplessError, match="num_classes"):
        create_head("ltpa", 64, 1)
    assert create_head("ltpa", 64, K, compatibility="pc").compatibility == "parametrised"
    assert create_head("ltpa", 64, K, compatibility="dp").compatibility == "dot"
    staged = create_head("ltpa", 64, K, stage_channels=(32,))
    with pytest.raises(ValueError, match="attention_stages=1"):
        staged(torch.randn(1, 64, 2, 2))  # built for an earlier stage, called without it
    with pytest.raises(ValueError, match=r"\(32,\) channels, got \(16,\)"):
        staged(torch.randn(1, 64, 2, 2), {"stages": [torch.randn(1, 16, 4, 4)]})
