"""Building blocks the heads need that timm has only in a form whose forward hides what we map.

- ``GateRecordingCbam``: timm's ``CbamModule`` (same parameters, same output) that keeps the spatial
  gate it applied, so the ``cbam`` head can show the last block's gate without forward hooks.
- ``ClassAttention`` / ``ClassAttentionBlock``: the CaiT / PatchConvNet class-attention block with the
  attention weights returned by ``forward``. timm's ``ClassAttn`` uses fused scaled-dot-product
  attention, which never materialises the weights, so they are computed explicitly here.
- ``fill_holes`` / ``masked_mean``: the two mask primitives every head (``pipeline.models.heads``) and
  the masked CBAM share. A mask is B×1×h×w bool, True where a position holds an instance; None means
  every position is valid (see ``Head``'s docstring for the contract).
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.layers.cbam import CbamModule
from torch import nn

try:
    from timm.layers import LayerScale
except ImportError:  # older timm kept LayerScale in its ViT module
    from timm.models.vision_transformer import LayerScale


def fill_holes(x: torch.Tensor, mask: torch.Tensor | None, value: float = 0.0) -> torch.Tensor:
    """``x`` (B×C×h×w) with ``value`` at the holes of ``mask`` (B×1×h×w bool); ``x`` itself when mask is None.

    A fill, not a product: whatever a hole held (garbage, inf, NaN) is gone, and no gradient reaches it.
    """
    return x if mask is None else x.masked_fill(~mask, value)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of B×C×h×w over the valid positions: B×C, (1/n_b) Σ_{ij valid} x_b,c,ij with n_b = the
    sample's number of valid positions. mask None: ``x.mean(dim=(2, 3))``, the unmasked path unchanged."""
    if mask is None:
        return x.mean(dim=(2, 3))
    count = mask.sum(dim=(2, 3)).to(x.dtype)  # B×1
    return fill_holes(x, mask).sum(dim=(2, 3)) / count


class GateRecordingCbam(CbamModule):
    """CBAM (Woo et al., ECCV 2018) that remembers its spatial gate.

    Drop-in for timm's ``CbamModule`` (``block_args=dict(attn_layer=GateRecordingCbam)``): identical
    parameter names, so weights move freely between the two. Channel gate first, then the spatial
    gate σ(conv7×7([mean_c x, max_c x])) of shape B×1×h×w, values in (0, 1) — a sigmoid per position,
    not a distribution over positions.

    When ``record`` is set (the ``cbam`` head sets it on the last block only), the gate of the latest
    forward is kept in ``last_gate`` until the head takes it with ``pop_gate``; it is a plain
    attribute write, which ``torch.compile`` treats as a side effect rather than a graph break.

    ``mask`` (B×1×h×w bool, True at instances; the slide-level encoder passes it, a timm block never
    does): the channel gate reads the mean and the max over the valid positions only, the input's holes
    are set to 0 before anything else, the spatial gate's 7×7 conv runs over the whole grid (a hole
    reads as 0, like the zero padding at the border) and the recorded gate is 0 at holes, so the output
    is 0 at holes and does not depend on what they held. (In training mode the spatial conv's BatchNorm
    takes its statistics over every position of the batch, holes included.) Without a mask the forward
    is timm's, unchanged.
    How well it works: timm's own note on CBAM says results are mixed and can hurt fine-grained tasks.
    """

    record: bool = False
    last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.channel(x) if mask is None else self._masked_channel(x, mask)
        spatial = self.spatial  # timm SpatialAttn: conv (ConvNormAct) then gate (sigmoid)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        gate = fill_holes(spatial.gate(spatial.conv(pooled)), mask)
        if self.record:
            self.last_gate = gate
        return x * gate

    def _masked_channel(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """timm's ChannelAttn with its mean and max pooled over the valid positions (holes → 0)."""
        channel = self.channel
        x = fill_holes(x, mask)
        avg = masked_mean(x, mask)[:, :, None, None]
        peak = fill_holes(x, mask, float("-inf")).amax(dim=(2, 3), keepdim=True)
        x_avg = channel.fc2(channel.act(channel.fc1(avg)))
        x_max = channel.fc2(channel.act(channel.fc1(peak)))
        return x * channel.gate(x_avg + x_max)

    def pop_gate(self) -> torch.Tensor | None:
        """The gate of the latest forward (B×1×h×w), cleared so no activation outlives its batch."""
        gate, self.last_gate = self.last_gate, None
        return gate


class ClassAttention(nn.Module):
    """One learned query (the class token) attending over N positions; returns the weights too.

    softmax(q·kᵀ/√d) over the positions only: unlike CaiT, the class token does not attend to itself,
    so the weights are a distribution over the image (they sum to 1 per head). Parameter layout follows
    timm's ``ClassAttn`` (q, k, v, proj linears). The query projection starts at zero, so the initial
    attention is exactly uniform and the head starts as average pooling of the values.
    """

    def __init__(self, dim: int, num_heads: int = 1, qkv_bias: bool = True, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.q.weight)  # zero attention logits: uniform attention at the start
        if self.q.bias is not None:
            nn.init.zeros_(self.q.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # B×H×n×d_h

    def forward(
        self, cls_token: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cls_token B×1×D, tokens B×N×D → (attended B×1×D, weights B×H×N summing to 1 over N).

        mask: optional B×N bool key mask, True where a token is an instance; the others get a score of
        −inf before the softmax, so their weights are exactly 0 and the weights sum to 1 over the valid
        tokens (each sample needs one). None: every token attends.
        """
        b, _, d = cls_token.shape
        q, k, v = self._split(self.q(cls_token)), self._split(self.k(tokens)), self._split(self.v(tokens))
        scores = ((q * self.scale) @ k.transpose(-2, -1)).float()  # B×H×1×N
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        weights = scores.softmax(dim=-1)
        attended = self.attn_drop(weights).to(v.dtype) @ v  # B×H×1×d_h
        attended = attended.transpose(1, 2).reshape(b, 1, d)
        return self.proj(attended), weights.squeeze(2)

    def values_alone(self, tokens: torch.Tensor) -> torch.Tensor:
        """What ``forward`` returns, per position, if every head put all its weight there: B×N×D."""
        return self.proj(self.v(tokens))


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention block (Touvron et al., ICCV 2021), as PatchConvNet uses it for pooling.

    pre-norm class attention and MLP, each added to the class token through LayerScale. ``forward``
    gives the updated class token and the attention weights; ``per_position`` gives the class token
    the block would output had the attention been entirely on each position (the counterfactual the
    ``attnpool`` head turns into per-position logits).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        init_values: float = 1e-4,
        qkv_bias: bool = True,
        drop: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=drop)
        self.ls1 = LayerScale(dim, init_values=init_values)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.ls2 = LayerScale(dim, init_values=init_values)

    def _finish(self, cls_token: torch.Tensor) -> torch.Tensor:
        return cls_token + self.ls2(self.mlp(self.norm2(cls_token)))

    def forward(
        self, cls_token: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cls_token B×1×D, tokens B×N×D → (class token B×1×D, weights B×H×N); ``mask``: an optional B×N
        bool key mask (``ClassAttention.forward``)."""
        attended, weights = self.attn(self.norm1(cls_token), self.norm1(tokens), mask)
        return self._finish(cls_token + self.ls1(attended)), weights

    def per_position(self, cls_token: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The block's class-token output with all attention on position j, for every j: B×N×D."""
        return self._finish(cls_token + self.ls1(self.attn.values_alone(self.norm1(tokens))))
