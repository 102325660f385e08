"""Building blocks the heads need that timm has only in a form whose forward hides what we map.

- ``GateRecordingCbam``: timm's ``CbamModule`` (same parameters, same output) that keeps the spatial
  gate it applied, so the ``cbam`` head can show the last block's gate without forward hooks.
- ``ClassAttention`` / ``ClassAttentionBlock``: the CaiT / PatchConvNet class-attention block with the
  attention weights returned by ``forward``. timm's ``ClassAttn`` uses fused scaled-dot-product
  attention, which never materialises the weights, so they are computed explicitly here.
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


class GateRecordingCbam(CbamModule):
    """CBAM (Woo et al., ECCV 2018) that remembers its spatial gate.

    Drop-in for timm's ``CbamModule`` (``block_args=dict(attn_layer=GateRecordingCbam)``): identical
    parameter names, so weights move freely between the two. Channel gate first, then the spatial
    gate σ(conv7×7([mean_c x, max_c x])) of shape B×1×h×w, values in (0, 1) — a sigmoid per position,
    not a distribution over positions.

    When ``record`` is set (the ``cbam`` head sets it on the last block only), the gate of the latest
    forward is kept in ``last_gate`` until the head takes it with ``pop_gate``; it is a plain
    attribute write, which ``torch.compile`` treats as a side effect rather than a graph break.
    How well it works: timm's own note on CBAM says results are mixed and can hurt fine-grained tasks.
    """

    record: bool = False
    last_gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel(x)
        spatial = self.spatial  # timm SpatialAttn: conv (ConvNormAct) then gate (sigmoid)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        gate = spatial.gate(spatial.conv(pooled))
        if self.record:
            self.last_gate = gate
        return x * gate

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

    def forward(self, cls_token: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls_token B×1×D, tokens B×N×D → (attended B×1×D, weights B×H×N summing to 1 over N)."""
        b, _, d = cls_token.shape
        q, k, v = self._split(self.q(cls_token)), self._split(self.k(tokens)), self._split(self.v(tokens))
        weights = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # B×H×1×N
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

    def forward(self, cls_token: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls_token B×1×D, tokens B×N×D → (class token B×1×D, weights B×H×N)."""
        attended, weights = self.attn(self.norm1(cls_token), self.norm1(tokens))
        return self._finish(cls_token + self.ls1(attended)), weights

    def per_position(self, cls_token: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The block's class-token output with all attention on position j, for every j: B×N×D."""
        return self._finish(cls_token + self.ls1(self.attn.values_alone(self.norm1(tokens))))
