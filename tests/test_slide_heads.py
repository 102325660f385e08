"""The heads at the slide level: the mask contract (holes never matter, attention and contribution 0 at
holes, the identities over the valid positions, the same result as the valid positions alone), the
gated-attention head (ABMIL), and SlideModel (grid encoder + any registered head, the mask-aware CBAM
block, Grad-CAM, config round trip, learning a witness). Every registered head is covered by looping
over HEADS. CPU, random weights, small grids."""

from __future__ import annotations

import json
import math
import types
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from timm.layers.cbam import CbamModule

from pipeline.errors import GaplessError
from pipeline.head_info import registered_heads
from pipeline.heatmap.gradcam import forward_grad_cam
from pipeline.models import (
    HEADS,
    GatedAttentionHead,
    GateRecordingCbam,
    Head,
    HeadOutput,
    SlideModel,
    create_head,
    create_model,
    create_slide_model,
    head_catalog,
    register_head,
)
from pipeline.models.heads import masked_mean, position_mask, resize_mask
from pipeline.models.ltpa import sum_pool_to

K = 3
C = 16
ALL_HEADS = sorted(HEADS)  # every registered head, as collected


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: one thread is 10-20× faster than two on a loaded 2-core machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loss(out: HeadOutput, target: torch.Tensor) -> torch.Tensor:
    if out.scores_are_log_probs:
        return F.nll_loss(out.logits, target)
    return F.cross_entropy(out.logits, target)


def _scramble(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Every parameter drawn from N(0, std²): a fresh head's zero attention logits would make every
    attention uniform and the comparisons below vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _mask(b: int, h: int, w: int, seed: int = 0, keep: float = 0.6) -> torch.Tensor:
    """B×1×h×w bool with holes in every sample and at least two valid positions in each."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, 1, h, w, generator=g) < keep
    flat = mask.view(b, -1)
    flat[:, 0], flat[:, -1] = True, False  # ≥ 1 valid, ≥ 1 hole
    flat[:, h * w // 2] = True
    return mask


def _with_garbage(x: torch.Tensor, mask: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """x with large random values at the holes, and inf, −inf and NaN at three of them."""
    g = torch.Generator().manual_seed(seed)
    holes = ~mask.expand_as(x)
    garbage = torch.where(holes, 1e4 * torch.randn(x.shape, generator=g), x)
    flat = garbage.view(-1)
    where = holes.reshape(-1).nonzero().flatten()
    flat[where[0]], flat[where[len(where) // 2]], flat[where[-1]] = float("inf"), float("-inf"), float("nan")
    return garbage


def _at_holes(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t.masked_select(~mask.expand_as(t))


def _valid_only(features: torch.Tensor, mask: torch.Tensor, b: int) -> torch.Tensor:
    """Sample b's valid positions, row-major, as a 1×C×1×n grid."""
    return features[b][:, mask[b, 0]].unsqueeze(0).unsqueeze(2)


# ------------------------------------------------------------------------------------------- helpers


def test_position_mask_checks_the_mask() -> None:
    features = torch.randn(2, C, 3, 4)
    assert position_mask(None, features) is None and position_mask({"mask": None}, features) is None
    mask = _mask(2, 3, 4)
    assert position_mask({"mask": mask}, features) is mask
    with pytest.raises(ValueError, match="bool tensor of shape"):
        position_mask({"mask": mask.float()}, features)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        position_mask({"mask": mask[:, 0]}, features)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(GaplessError, match="no valid position"):
        position_mask({"mask": empty}, features)


def test_masked_mean_and_resize_mask() -> None:
    x, mask = torch.randn(2, C, 3, 5), _mask(2, 3, 5)
    for b in range(2):
        torch.testing.assert_close(masked_mean(_with_garbage(x, mask), mask)[b], x[b][:, mask[b, 0]].mean(dim=1))
    assert torch.equal(masked_mean(x, None), x.mean(dim=(2, 3)))
    # a finer grid (5 → 3 rows, 9 → 5 columns: windows that do not divide): each fine cell is valid
    # exactly when the coarse cell sum_pool_to adds it to is
    fine = resize_mask(mask, (5, 9))
    assert fine.shape == (2, 1, 5, 9) and fine.dtype == torch.bool
    pooled_valid = sum_pool_to(fine.float(), (3, 5))
    pooled_holes = sum_pool_to((~fine).float(), (3, 5))
    assert (pooled_valid[~mask] == 0).all() and (pooled_holes[mask] == 0).all()
    assert resize_mask(None, (5, 9)) is None and resize_mask(mask, (3, 5)) is mask


# ---------------------------------------------------------------------------- every head, with a mask


@pytest.mark.parametrize("name", ALL_HEADS)
def test_holes_do_not_matter_and_hold_no_attention_or_contribution(name: str) -> None:
    torch.manual_seed(0)
    head = create_head(name, C, K)
    _scramble(head)
    features, mask = torch.randn(3, C, 4, 5), _mask(3, 4, 5)
    clean = torch.where(mask, features, torch.zeros(()))
    out = head(clean, {"mask": mask})
    garbage = _with_garbage(features, mask).requires_grad_(True)
    dirty = head(garbage, {"mask": mask})
    assert torch.isfinite(dirty.logits).all() and torch.isfinite(dirty.contribution).all()
    assert torch.equal(dirty.logits, out.logits) and torch.equal(dirty.contribution, out.contribution)
    assert (_at_holes(out.contribution, mask) == 0).all()
    if out.attention is not None:
        assert torch.equal(dirty.attention, out.attention)
        assert (_at_holes(out.attention, mask) == 0).all() and (out.attention >= 0).all()
    _loss(dirty, torch.tensor([0, 1, 2])).backward()
    assert torch.isfinite(garbage.grad).all() and (_at_holes(garbage.grad, mask) == 0).all()
    assert garbage.grad.abs().sum() > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("name", ALL_HEADS)
def test_a_grid_with_holes_is_its_valid_positions_alone(name: str) -> None:
    """The contract: the head on a grid with holes = the head on a 1×n grid of the valid positions
    (row-major) — logits, and attention and contribution at the valid positions."""
    torch.manual_seed(0)
    head = create_head(name, C, K).eval()
    _scramble(head, seed=2)
    features, mask = torch.randn(3, C, 4, 5), _mask(3, 4, 5, seed=3)
    out = head(_with_garbage(features, mask), {"mask": mask})
    for b in range(3):
        alone = head(_valid_only(features, mask, b))
        torch.testing.assert_close(out.logits[b], alone.logits[0], rtol=1e-5, atol=1e-5)
        valid = mask[b, 0]
        torch.testing.assert_close(out.contribution[b][:, valid], alone.contribution[0, :, 0], rtol=1e-5, atol=1e-6)
        assert (out.attention is None) == (alone.attention is None)
        if out.attention is not None:
            torch.testing.assert_close(out.attention[b][:, valid], alone.attention[0, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_without_a_mask_nothing_changes(name: str) -> None:
    torch.manual_seed(0)
    head = create_head(name, C, K).eval()
    _scramble(head, seed=4)
    features = torch.randn(2, C, 3, 4)
    plain = head(features)
    none = head(features, {"mask": None})
    assert torch.equal(plain.logits, none.logits) and torch.equal(plain.contribution, none.contribution)
    full = head(features, {"mask": torch.ones(2, 1, 3, 4, dtype=torch.bool)})  # every position valid
    torch.testing.assert_close(full.logits, plain.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.contribution, plain.contribution, rtol=1e-5, atol=1e-6)


def _gap_identity(out, head, mask):
    mean = out.contribution.sum(dim=(2, 3)) / mask.sum(dim=(2, 3))  # the mean over the VALID positions
    torch.testing.assert_close(mean, out.logits, rtol=1e-5, atol=1e-5)


def _sum_plus_bias_identity(out, head, mask):
    torch.testing.assert_close(out.contribution.sum(dim=(2, 3)) + head.fc.bias, out.logits, rtol=1e-5, atol=1e-5)


def _saol_identity(out, head, mask):
    torch.testing.assert_close(out.contribution.sum(dim=(2, 3)), out.logits.exp(), rtol=1e-5, atol=1e-6)


IDENTITIES = {"gap": _gap_identity, "cbam": _gap_identity, "max": _sum_plus_bias_identity,
              "ltpa": _sum_plus_bias_identity, "gated": _sum_plus_bias_identity, "saol": _saol_identity}


@pytest.mark.parametrize("name", sorted(IDENTITIES))
def test_each_heads_identity_holds_over_the_valid_positions(name: str) -> None:
    torch.manual_seed(0)
    head = create_head(name, C, K)
    _scramble(head, seed=5)
    features, mask = torch.randn(3, C, 4, 5), _mask(3, 4, 5, seed=6)
    out = head(_with_garbage(features, mask), {"mask": mask})
    IDENTITIES[name](out, head, mask)
    if out.attention is not None:  # a distribution over the valid positions
        torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(3, 1), rtol=0, atol=1e-5)


def test_attnpool_sums_to_its_logits_when_the_valid_positions_are_alike() -> None:
    """attnpool's documented exact case: all (valid) positions alike → Σ contribution = logits."""
    torch.manual_seed(0)
    head = create_head("attnpool", C, K, num_heads=2)
    _scramble(head, seed=7)
    mask = _mask(2, 4, 5, seed=8)
    same = torch.randn(2, C, 1, 1).expand(2, C, 4, 5).contiguous()
    out = head(_with_garbage(same, mask), {"mask": mask})
    torch.testing.assert_close(out.contribution.sum(dim=(2, 3)), out.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(2, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_tile_scale_heads_take_a_mask_on_every_stage(name: str) -> None:
    """At the tile level (resnet10t), a mask on the final grid reaches fused earlier stages resized
    (80×112 px: a 3×4 final grid, 5×7 at layer3 — windows that do not divide)."""
    torch.manual_seed(0)
    model = create_model("resnet10t", name, num_classes=K).eval()
    _scramble(model.head, seed=9, std=0.1)
    with torch.no_grad():
        features, extra = model.forward_features(torch.randn(2, 3, 80, 112))
        assert features.shape[-2:] == (3, 4)
        mask = _mask(2, 3, 4, seed=10)
        out = model.head(features, {**extra, "mask": mask})
    assert (_at_holes(out.contribution, mask) == 0).all()
    if out.attention is not None:
        assert (_at_holes(out.attention, mask) == 0).all()
    if name in IDENTITIES:
        IDENTITIES[name](out, model.head, mask)


# -------------------------------------------------------------------------------------- gated (ABMIL)


def test_gated_is_registered_and_catalogued() -> None:
    assert HEADS["gated"] is GatedAttentionHead and not GatedAttentionHead.scores_are_log_probs
    info = GatedAttentionHead.info()
    assert (info.name, info.label, info.order, info.baseline) == ("gated", "Gated attention (ABMIL)", 37, False)
    assert info.description and "\n" not in info.description
    order = list(head_catalog())
    assert order.index("attnpool") < order.index("ltpa") < order.index("gated") < order.index("saol")
    assert registered_heads()["gated"] == info  # what the workflow checks head names against


def _gated_reference(head: GatedAttentionHead, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's formulas written out, one bag at a time: a = softmax(wᵀ(tanh(V h) ⊙ σ(U h))), W z + b."""
    logits, attention = [], []
    for bag in features.flatten(2).transpose(1, 2):  # N×C
        scores = head.attention_w(torch.tanh(head.attention_v(bag)) * torch.sigmoid(head.attention_u(bag)))
        a = torch.softmax(scores.squeeze(1), dim=0)
        logits.append(head.fc(a @ bag))
        attention.append(a)
    return torch.stack(logits), torch.stack(attention)


def test_gated_follows_the_paper_and_its_contribution_sums_to_the_logits() -> None:
    torch.manual_seed(0)
    head = create_head("gated", 24, K, hidden=32)
    assert head.attention_v.out_features == head.attention_u.out_features == 32
    _scramble(head, seed=11)
    features = torch.randn(2, 24, 5, 7)
    out = head(features)
    logits, attention = _gated_reference(head, features)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.attention.flatten(1), attention, rtol=1e-5, atol=1e-7)
    assert out.attention.std() > 0 and not out.scores_are_log_probs
    _sum_plus_bias_identity(out, head, None)
    # contribution / attention is W h_i: position i's own class scores
    torch.testing.assert_close(out.contribution / out.attention, F.conv2d(features, head.fc.weight[:, :, None, None]),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(GaplessError, match="hidden"):
        create_head("gated", 24, K, hidden=0)


def test_gated_starts_uniform_near_the_prior() -> None:
    torch.manual_seed(0)
    prior = torch.tensor([0.7, 0.2, 0.1])
    head = create_head("gated", C, K, class_prior=prior.tolist())
    features, mask = torch.randn(2, C, 4, 5), _mask(2, 4, 5, seed=12)
    out = head(features)
    assert torch.equal(out.attention, torch.full_like(out.attention, 1 / 20))  # exactly uniform
    assert (out.logits.softmax(dim=1) - prior).abs().max() < 0.05
    masked = head(features, {"mask": mask})
    expected = mask.float() / mask.sum(dim=(2, 3), keepdim=True)  # uniform over the valid positions
    torch.testing.assert_close(masked.attention, expected, rtol=0, atol=1e-7)


def test_gated_stays_float32_and_exact_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    head = create_head("gated", C, K)
    _scramble(head, seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = head(torch.randn(2, C, 4, 5), {"mask": _mask(2, 4, 5)})
    assert out.logits.dtype == out.attention.dtype == torch.float32
    torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(2, 1), rtol=0, atol=1e-5)
    _sum_plus_bias_identity(out, head, None)


def test_gated_learns_to_attend_to_a_witness_on_a_tile_feature_map() -> None:
    """Bare head, 4×4 maps of 32 channels: positives carry evidence at one random position. After 60
    Adam steps the held-out bags are classified and the attention sits on the witness."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = create_head("gated", 32, 2)
    signal = torch.randn(32, generator=g).abs()

    def bags(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 32, 4, 4, generator=g).relu()
        y = torch.arange(n) % 2
        where = torch.randint(0, 16, (n,), generator=g)
        x.view(n, 32, 16)[y == 1, :, where[y == 1]] += signal
        return x, y, where

    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(60):
        x, y, _ = bags(32)
        loss = F.cross_entropy(head(x).logits, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    x, y, where = bags(200)
    with torch.no_grad():
        out = head(x)
    assert (out.logits.argmax(dim=1) == y).float().mean() > 0.9
    on_witness = out.attention.flatten(1)[y == 1].gather(1, where[y == 1, None])
    assert on_witness.mean() > 0.5  # uniform would be 1/16


# ----------------------------------------------------------------------------------- the masked CBAM


def test_masked_cbam_ignores_holes_and_keeps_timms_forward_without_a_mask() -> None:
    torch.manual_seed(0)
    ours, theirs = GateRecordingCbam(32), CbamModule(32)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    ours.record = True
    x, mask = torch.randn(2, 32, 5, 6), _mask(2, 5, 6, seed=14)
    torch.testing.assert_close(ours(x), theirs(x))  # no mask: timm's CBAM
    torch.testing.assert_close(ours(x, mask=torch.ones(2, 1, 5, 6, dtype=torch.bool)), theirs(x))
    clean = ours(torch.where(mask, x, torch.zeros(())), mask=mask)
    gate = ours.pop_gate()
    dirty = ours(_with_garbage(x, mask), mask=mask)
    assert torch.equal(clean, dirty) and torch.equal(gate, ours.pop_gate())
    assert (_at_holes(clean, mask) == 0).all() and (_at_holes(gate, mask) == 0).all()
    assert ((gate[mask] > 0) & (gate[mask] < 1)).all()
    # the channel gate reads the valid positions only: a sample's own valid positions decide it
    x2 = x.clone()
    x2[0][:, ~mask[0, 0]] += 5.0  # change only sample 0's holes
    torch.testing.assert_close(ours(x2, mask=mask), clean)


# -------------------------------------------------------------------------------------------- SlideModel


D = 12


def _slide(name: str, **kw) -> SlideModel:
    torch.manual_seed(0)
    model = create_slide_model(name, K, in_dim=D, dim=16, **kw)
    _scramble(model.head, seed=15)
    return model


@pytest.mark.parametrize("name", ALL_HEADS)
def test_every_head_through_slide_model(name: str) -> None:
    model = _slide(name).eval()
    assert model.head.feature_stages == 1  # a slide grid has one stage, whatever the head
    grid, mask = torch.randn(3, D, 5, 6), _mask(3, 5, 6, seed=16)
    out = model(torch.where(mask, grid, torch.zeros(())), mask)
    dirty = model(_with_garbage(grid, mask), mask)
    assert out.logits.shape == (3, K) and out.contribution.shape == (3, K, 5, 6)
    assert torch.equal(out.logits, dirty.logits) and torch.equal(out.contribution, dirty.contribution)
    assert (_at_holes(out.contribution, mask) == 0).all()
    if out.attention is not None:
        assert out.attention.shape == (3, 1, 5, 6) and torch.equal(out.attention, dirty.attention)
        assert (_at_holes(out.attention, mask) == 0).all()
    features, extra = model.forward_features(grid, mask)
    assert features.shape == (3, 16, 5, 6) and extra["mask"] is mask
    assert (_at_holes(features, mask) == 0).all()
    # backward, in training mode (dropout on)
    model.train()
    garbage = _with_garbage(grid, mask).requires_grad_(True)
    _loss(model(garbage, mask), torch.tensor([0, 1, 2])).backward()
    assert torch.isfinite(garbage.grad).all() and (_at_holes(garbage.grad, mask) == 0).all()
    assert garbage.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.proj.parameters())


@pytest.mark.parametrize("name", ALL_HEADS)
def test_gradcam_runs_unchanged_on_a_slide_model(name: str) -> None:
    model = _slide(name).eval()
    grid, mask = torch.randn(2, D, 4, 5), _mask(2, 4, 5, seed=17)
    # forward_grad_cam takes one input: bind the slide's mask, nothing else changes
    bound = types.SimpleNamespace(forward_features=lambda x: model.forward_features(x, mask), head=model.head,
                                  training=False)
    out, cam = forward_grad_cam(bound, grid)
    with torch.no_grad():
        plain = model(grid, mask)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    assert cam.shape == (2, 1, 4, 5) and torch.isfinite(cam).all() and (cam >= 0).all()
    assert (_at_holes(cam, mask) == 0).all()  # the encoder's output is 0 at holes


def test_cbam_reads_the_gate_of_the_slide_encoders_cbam_block() -> None:
    model = _slide("cbam").eval()
    assert isinstance(model.encoder.attn, GateRecordingCbam) and model.encoder.attn.record
    assert model.head._gate_module == "attn"
    grid, mask = torch.randn(2, D, 5, 6), _mask(2, 5, 6, seed=18)
    out = model(grid, mask)
    assert out.attention is not None and out.attention.shape == (2, 1, 5, 6)
    assert ((out.attention[mask] > 0) & (out.attention[mask] < 1)).all()
    assert (_at_holes(out.attention, mask) == 0).all()
    assert model.encoder.attn.last_gate is None  # taken by the head: nothing outlives the batch
    plain = create_slide_model("gap", K, in_dim=D, dim=16)
    assert plain.encoder.attn is None  # only a head that asks for it gets the block


def test_slide_model_rebuilds_from_its_config() -> None:
    model = create_slide_model("gated", K, in_dim=D, dim=24, dropout=0.1, hidden=20, class_prior=[0.5, 0.3, 0.2])
    config = json.loads(json.dumps(model.config()))
    assert config == {"head": "gated", "num_classes": K, "in_dim": D, "dim": 24, "dropout": 0.1,
                      "head_kwargs": {"hidden": 20, "class_prior": [0.5, 0.3, 0.2]}}
    again = SlideModel.from_config(config)
    again.load_state_dict(model.state_dict())
    model.eval(), again.eval()
    grid, mask = torch.randn(2, D, 4, 4), _mask(2, 4, 4)
    assert torch.equal(model(grid, mask).logits, again(grid, mask).logits)
    for name in ALL_HEADS:  # every head: its config round-trips (stage_channels are not recorded)
        built = create_slide_model(name, K, in_dim=D)
        rebuilt = SlideModel.from_config(json.loads(json.dumps(built.config())))
        assert rebuilt.state_dict().keys() == built.state_dict().keys()
    with pytest.raises(GaplessError, match="config has keys"):
        SlideModel.from_config({"head": "gap", "num_classes": K, "in_dim": D, "backbone": "resnet18"})


def test_slide_model_says_what_it_cannot_build() -> None:
    @register_head("test_wants_timm_kwargs")
    class WantsTimm(Head):
        backbone_kwargs: ClassVar[dict[str, Any]] = {"drop_path_rate": 0.1}

        def forward(self, features, extra=None):  # pragma: no cover - never built
            raise NotImplementedError

    @register_head("test_plain_cbam")
    class PlainCbam(Head):
        backbone_kwargs: ClassVar[dict[str, Any]] = {"block_args": {"attn_layer": CbamModule}}  # timm's: not mask-aware

        def forward(self, features, extra=None):  # pragma: no cover - never built
            raise NotImplementedError

    try:
        for name in ("test_wants_timm_kwargs", "test_plain_cbam"):
            with pytest.raises(GaplessError, match=f"head '{name}' asks its backbone.*attn_layer"):
                create_slide_model(name, K, in_dim=D)
    finally:
        HEADS.pop("test_wants_timm_kwargs", None)
        HEADS.pop("test_plain_cbam", None)
    model = create_slide_model("gap", K, in_dim=D)
    with pytest.raises(GaplessError, match="in_dim=7"):
        model(torch.randn(1, 7, 3, 3), torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(GaplessError, match="no valid position"):
        model(torch.randn(1, D, 3, 3), torch.zeros(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(GaplessError, match="stage_channels"):
        create_slide_model("saol", K, in_dim=D, stage_channels=(64,))
    with pytest.raises(GaplessError, match="unknown head"):
        create_slide_model("nope", K, in_dim=D)


WITNESS_HEADS = ["gated", "attnpool", "max"]


@pytest.mark.parametrize("name", WITNESS_HEADS)
def test_slide_model_learns_a_witness_tile(name: str) -> None:
    """Bags on an 8×8 tile grid with ~30 % holes (garbage there); a positive bag has one witness
    embedding at a random valid position, a negative none. 120 Adam steps on batches of 24 fresh bags;
    held-out accuracy > 0.9 (GAP, diluted by ~45 tiles, reached ≈ 0.70 in 200 steps when this was
    written), and an attention map, where the head has one, puts its maximum on the witness."""
    g = torch.Generator().manual_seed(0)
    witness = torch.zeros(D)
    witness[:4] = 2.5

    def bags(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = torch.randn(n, D, 8, 8, generator=g)
        mask = torch.rand(n, 1, 8, 8, generator=g) > 0.3
        mask.view(n, -1)[:, 0] = True
        y = torch.arange(n) % 2
        where = torch.full((n,), -1)
        for b in range(n):
            if y[b]:
                valid = mask[b, 0].flatten().nonzero().flatten()
                where[b] = int(valid[torch.randint(len(valid), (1,), generator=g)])
                grid[b].view(D, 64)[:, where[b]] = witness + 0.5 * torch.randn(D, generator=g)
        return _with_garbage(grid, mask, seed=int(torch.randint(1 << 30, (1,), generator=g))), mask, y, where

    torch.manual_seed(0)
    model = create_slide_model(name, 2, in_dim=D, dim=32, dropout=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        grid, mask, y, _ = bags(24)
        loss = _loss(model(grid, mask), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    grid, mask, y, where = bags(200)
    with torch.no_grad():
        out = model(grid, mask)
    accuracy = float((out.logits.argmax(dim=1) == y).float().mean())
    assert accuracy > 0.9, f"{name}: held-out accuracy {accuracy:.3f}"
    if out.attention is not None:
        peak = out.attention.flatten(1)[y == 1].argmax(dim=1)
        assert (peak == where[y == 1]).float().mean() > 0.9
    assert math.isfinite(loss.item())
