"""Heads and models: shapes, the documented contribution↔score identities, gradients, CBAM wiring,
stem adaptation, local weights, and the registry. CPU, random weights, small images."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers.cbam import CbamModule
from timm.models.resnet import BasicBlock, Bottleneck

from pipeline.errors import GaplessError
from pipeline.models import (
    HEADS,
    GateRecordingCbam,
    Head,
    HeadOutput,
    InstanceModel,
    create_head,
    create_model,
    register_head,
)

BACKBONE = "resnet10t"  # 4 BasicBlocks, 512 channels at stride 32: the smallest timm ResNet
K = 3
SIZES = [(1, 64, 64), (2, 64, 96)]  # batch of one, square; batch of two, non-square
ALL_HEADS = sorted(HEADS)  # every registered head, as collected


@pytest.fixture(scope="module")
def models() -> dict[str, InstanceModel]:
    torch.manual_seed(0)
    return {name: create_model(BACKBONE, name, num_classes=K) for name in ALL_HEADS}


def _loss(out: HeadOutput, target: torch.Tensor) -> torch.Tensor:
    if out.scores_are_log_probs:
        return F.nll_loss(out.logits, target)
    return F.cross_entropy(out.logits, target)


def test_registry_has_the_five_heads() -> None:
    assert {"gap", "max", "cbam", "attnpool", "saol"} <= set(HEADS)
    assert [name for name, cls in HEADS.items() if cls.scores_are_log_probs] == ["saol"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ALL_HEADS)
def test_shapes_on_the_backbone_grid(models, name: str, size: tuple[int, int, int]) -> None:
    model = models[name]
    b, height, width = size
    x = torch.randn(b, 3, height, width)
    with torch.no_grad():
        grid = model.backbone.forward_features(x).shape[-2:]
        out = model(x)
    assert grid == (height // 32, width // 32)
    assert out.logits.shape == (b, K)
    assert out.contribution.shape == (b, K, *grid)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.contribution).all()
    if name in ("gap", "max"):
        assert out.attention is None
        return
    assert out.attention is not None and out.attention.shape == (b, 1, *grid)
    if name == "cbam":  # a sigmoid gate per position
        assert ((out.attention > 0) & (out.attention < 1)).all()
    else:  # a softmax over positions
        assert torch.allclose(out.attention.sum(dim=(2, 3)), torch.ones(b, 1), atol=1e-5)


@pytest.mark.parametrize("name", ["gap", "cbam"])
def test_gap_cam_mean_equals_logits(models, name: str) -> None:
    out = models[name](torch.randn(2, 3, 64, 96))
    torch.testing.assert_close(out.contribution.mean(dim=(2, 3)), out.logits, rtol=1e-5, atol=1e-5)


def test_max_contribution_sums_to_logits_minus_bias(models) -> None:
    model = models["max"]
    out = model(torch.randn(2, 3, 64, 96))
    summed = out.contribution.sum(dim=(2, 3)) + model.head.fc.bias
    torch.testing.assert_close(summed, out.logits, rtol=1e-5, atol=1e-5)
    # at most one position per channel carries a channel's term: sparse where channels agree
    c = model.head.in_channels
    assert (out.contribution[0, 0] != 0).sum() <= min(c, out.contribution[0, 0].numel())


def test_saol_scores_are_log_probabilities_and_contribution_sums_to_p(models) -> None:
    out = models["saol"](torch.randn(2, 3, 64, 96))
    p = out.logits.exp()
    assert out.scores_are_log_probs and out.logits.dtype == torch.float32
    torch.testing.assert_close(p.sum(dim=1), torch.ones(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.contribution.sum(dim=(2, 3)), p, rtol=1e-5, atol=1e-6)
    assert (out.logits <= 0).all()


def test_saol_stays_float32_and_exact_under_bf16_autocast(models) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = models["saol"](torch.randn(2, 3, 64, 64))
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.exp().sum(dim=1), torch.ones(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.contribution.sum(dim=(2, 3)), out.logits.exp(), rtol=1e-5, atol=1e-6)


def test_saol_fuses_the_stage_before_the_last(models) -> None:
    model = models["saol"]
    assert model.head.feature_stages == 2 and model.stage_indices == [3]  # resnet: layer3
    assert model.head.spatial_logits.in_channels == 256 + 512
    x = torch.randn(1, 3, 64, 96)
    model.eval()
    try:
        with torch.no_grad():
            features, extra = model.forward_features(x)
            torch.testing.assert_close(features, model.backbone.forward_features(x))
        assert [s.shape[-2:] for s in extra["stages"]] == [(4, 6)]
    finally:
        model.train()
    single = create_model(BACKBONE, "saol", num_classes=K, fuse_stages=1)
    assert single.head.feature_stages == 1 and single.stage_indices == []
    assert single(x).contribution.shape == (1, K, 2, 3)


def test_bare_heads_work_on_a_feature_map() -> None:
    features = torch.randn(2, 64, 5, 7)
    for name in ALL_HEADS:
        out = create_head(name, 64, K)(features)
        assert out.logits.shape == (2, K) and out.contribution.shape == (2, K, 5, 7)


def test_attnpool_contribution_is_attention_times_per_position_logits() -> None:
    torch.manual_seed(0)
    head = create_head("attnpool", 32, K, num_heads=2, init_values=0.5)
    with torch.no_grad():  # make the attention non-uniform
        torch.nn.init.normal_(head.block.attn.q.weight, std=0.5)
    # identical positions: every per-position logit is the logit, so the sum is exact
    same = torch.randn(2, 32, 1, 1).expand(2, 32, 3, 4).contiguous()
    out = head(same)
    torch.testing.assert_close(out.contribution.sum(dim=(2, 3)), out.logits, rtol=1e-4, atol=1e-5)
    # in general: contribution / attention is a per-position logit that depends on that position only
    x = torch.randn(1, 32, 3, 4)
    out = head(x)
    assert out.attention.std() > 0
    per_position = out.contribution / out.attention
    y = x.clone()
    y[..., 0, 0] += 3.0 * torch.randn(32)  # (a constant shift would vanish in the LayerNorm)
    changed = head(y)
    per_position_changed = changed.contribution / changed.attention
    untouched = per_position_changed[..., 1:, :]
    torch.testing.assert_close(untouched, per_position[..., 1:, :], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(per_position_changed[..., 0, 0], per_position[..., 0, 0])


def test_attnpool_contribution_sums_close_to_logits_at_small_layerscale() -> None:
    # the gap between Σ contribution and the logits is second order in LayerScale γ: with γ = 1e-4 (the
    # default before the ablation) it is below 1e-4 at init; the default γ = 1 trades that for training
    torch.manual_seed(0)
    model = create_model(BACKBONE, "attnpool", num_classes=K, init_values=1e-4)
    out = model(torch.randn(2, 3, 64, 96))
    torch.testing.assert_close(out.contribution.sum(dim=(2, 3)), out.logits, rtol=1e-4, atol=1e-4)


def test_attnpool_attends_at_a_narrow_width_by_default() -> None:
    narrow = create_head("attnpool", 512, K)
    assert narrow.in_proj.in_features == 512 and narrow.block.attn.q.in_features == 128
    assert narrow.cls_token.shape == (1, 1, 128) and narrow.fc.in_features == 128
    wide = create_head("attnpool", 512, K, dim=None)  # the original head: the block at the backbone's width
    assert wide.block.attn.q.in_features == 512 and not any(k.startswith("in_proj") for k in wide.state_dict())
    n_narrow, n_wide = (sum(p.numel() for p in h.parameters()) for h in (narrow, wide))
    assert n_narrow < 0.1 * n_wide  # 0.27 M against 3.16 M parameters at C = 512
    with pytest.raises(ValueError, match="dim"):
        create_head("attnpool", 512, K, dim=0)


def test_attnpool_attention_does_not_collapse_in_the_first_adam_steps() -> None:
    """The CPU benchmark's stalls, head alone: 12 AdamW steps at its lr (2e-3) on 2×2 maps of 512 channels.
    At the backbone's width Adam's steps grow the query ~8× faster than at 128, and the attention turns
    ~one-hot within a dozen steps even when no position carries evidence; at 128 it stays spread until
    a position does, and then it finds that one."""

    def train(dim: int | None, evidence: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        head = create_head("attnpool", 512, 2, dim=dim)
        optimiser = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0.05)
        signal = torch.randn(512).abs()
        y = torch.arange(16) % 2
        for _ in range(12):
            x = torch.randn(16, 512, 2, 2).relu()
            where = torch.randint(0, 4, (16,))
            if evidence:  # the positives' evidence sits at one position each
                x.view(16, 512, 4)[y == 1, :, where[y == 1]] += signal
            out = head(x)
            optimiser.zero_grad()
            F.cross_entropy(out.logits, y).backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimiser.step()
        p = out.attention.detach().flatten(1)
        entropy = float(torch.special.entr(p).sum(1).mean() / torch.log(torch.tensor(4.0)))  # 1 = uniform
        return entropy, float(p[y == 1].gather(1, where[y == 1, None]).mean())

    assert train(128, evidence=False)[0] > 0.9  # nothing to find: the attention stays ≈ uniform
    assert train(None, evidence=False)[0] < 0.6  # the original width collapses onto noise: the test can tell
    assert train(128, evidence=True)[1] > 0.9  # evidence at one position: the attention goes there


@pytest.mark.parametrize("name", ALL_HEADS)
def test_gradients_reach_the_first_backbone_layer(models, name: str) -> None:
    model = models[name]
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 3, 64, 64))
    _loss(out, torch.tensor([0, 2])).backward()
    first = model.backbone.conv1[0].weight.grad  # resnet10t's deep stem: conv1 is a Sequential
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_heads_start_near_the_class_prior() -> None:
    prior = torch.tensor([0.8, 0.15, 0.05])
    torch.manual_seed(0)
    for name in ALL_HEADS:
        model = create_model(BACKBONE, name, num_classes=K, class_prior=prior.tolist())
        out = model(torch.randn(2, 3, 64, 64))
        p = out.logits.exp() if out.scores_are_log_probs else out.logits.softmax(dim=1)
        assert (p - prior).abs().max() < 0.05, name


def test_cbam_is_in_every_residual_block(models) -> None:
    backbone = models["cbam"].backbone
    blocks = [m for m in backbone.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == 4
    assert all(isinstance(block.se, GateRecordingCbam) for block in blocks)
    assert sum(isinstance(m, CbamModule) for m in backbone.modules()) == len(blocks)
    assert [b.se.record for b in blocks] == [False, False, False, True]  # only the last keeps its gate
    models["cbam"](torch.randn(1, 3, 64, 64))
    assert blocks[-1].se.last_gate is None  # the head took it: nothing outlives the batch


def test_cbam_gate_survives_torch_compile_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONE, "cbam", num_classes=K).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled.attention, eager.attention)
    torch.testing.assert_close(compiled.logits, eager.logits)
    copy.deepcopy(model)  # EMA copies the model after a forward: no activation may be left behind


def test_recording_cbam_computes_what_timm_cbam_computes() -> None:
    torch.manual_seed(0)
    ours, theirs = GateRecordingCbam(64), CbamModule(64)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    ours.record = True
    x = torch.randn(2, 64, 5, 6)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.pop_gate().shape == (2, 1, 5, 6)


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "vit_tiny_patch16_224"])
def test_cbam_on_a_non_resnet_backbone_says_what_to_use(backbone: str) -> None:
    with pytest.raises(GaplessError, match="ResNet-family") as err:
        create_model(backbone, "cbam", num_classes=K)
    assert backbone in str(err.value)


@pytest.mark.parametrize("name", ["gap", "cbam", "saol"])
def test_two_channel_fluorescence_input(name: str) -> None:
    model = create_model(BACKBONE, name, num_classes=K, in_chans=2)
    assert model.backbone.conv1[0].in_channels == 2
    out = model(torch.randn(2, 2, 64, 96))
    assert out.logits.shape == (2, K) and out.contribution.shape == (2, K, 2, 3)


def _same_backbone_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "\0") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items() if skip not in k)


def test_local_safetensors_weights_round_trip(tmp_path) -> None:
    source = create_model(BACKBONE, "gap", num_classes=K)
    path = tmp_path / "backbone.safetensors"
    save_file(source.backbone.state_dict(), str(path))
    loaded = create_model(BACKBONE, "saol", num_classes=K, pretrained=str(path))
    assert _same_backbone_weights(source.backbone, loaded.backbone)
    # a CBAM backbone takes plain weights; its CBAM modules (`.se.`) keep their fresh init
    cbam = create_model(BACKBONE, "cbam", num_classes=K, pretrained=path)
    assert _same_backbone_weights(source.backbone, cbam.backbone, skip=".se.")
    # an RGB stem is adapted to two channels the way timm adapts hub weights
    two = create_model(BACKBONE, "gap", num_classes=K, in_chans=2, pretrained=path)
    assert two.backbone.conv1[0].weight.shape[1] == 2


def test_whole_model_checkpoint_loads_its_backbone(tmp_path) -> None:
    trained = create_model(BACKBONE, "attnpool", num_classes=K)
    path = tmp_path / "model.pth"
    torch.save(trained.state_dict(), path)
    loaded = create_model(BACKBONE, "max", num_classes=K, pretrained=path)
    assert _same_backbone_weights(trained.backbone, loaded.backbone)


def test_timm_training_checkpoint_loads_without_its_classifier(tmp_path) -> None:
    full = timm.create_model(BACKBONE, num_classes=10)  # with its fc, saved the way DDP training does
    state = {f"module.{k}": v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": state}, path)
    loaded = create_model(BACKBONE, "gap", num_classes=K, pretrained=path)
    expected = {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, expected[k]) for k, v in loaded.backbone.state_dict().items())


def test_wrong_weights_file_is_a_gapless_error(tmp_path) -> None:
    other = create_model("resnet18", "gap", num_classes=K)
    path = tmp_path / "resnet18.safetensors"
    save_file(other.backbone.state_dict(), str(path))
    with pytest.raises(GaplessError, match="do not fit backbone 'resnet10t'") as err:
        create_model(BACKBONE, "gap", num_classes=K, pretrained=path)
    assert str(path) in str(err.value) and err.value.fix
    with pytest.raises(GaplessError, match="not found"):
        create_model(BACKBONE, "gap", num_classes=K, pretrained=tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(GaplessError, match="cannot read weights"):
        create_model(BACKBONE, "gap", num_classes=K, pretrained=garbage)


def test_unknown_names_are_gapless_errors() -> None:
    with pytest.raises(GaplessError, match="unknown head 'nope'.*gap"):
        create_model(BACKBONE, "nope", num_classes=K)
    with pytest.raises(GaplessError, match="unknown timm backbone"):
        create_model("resnet_does_not_exist", "gap", num_classes=K)
    with pytest.raises(GaplessError, match="num_classes"):
        create_model(BACKBONE, "gap", num_classes=1)


def test_a_new_head_needs_only_registration() -> None:
    @register_head("test_centre")
    class CentreHead(Head):
        """Scores the centre position only (a test head)."""

        def __init__(self, in_channels: int, num_classes: int, *, scale: float = 1.0):
            super().__init__(in_channels, num_classes)
            self.fc = torch.nn.Conv2d(in_channels, num_classes, 1)
            self.scale = scale

        def forward(self, features, extra=None) -> HeadOutput:
            maps = self.fc(features) * self.scale
            h, w = maps.shape[-2:]
            return HeadOutput(maps[..., h // 2, w // 2], maps, None, False)

    try:
        model = create_model(BACKBONE, "test_centre", num_classes=K, scale=2.0)
        assert isinstance(model.head, CentreHead) and model.head.scale == 2.0
        out = model(torch.randn(1, 3, 64, 96))
        assert out.logits.shape == (1, K) and out.contribution.shape == (1, K, 2, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_head("test_centre")(type("Other", (Head,), {}))
    finally:
        HEADS.pop("test_centre", None)
