"""DIIA: Dynamic Intra- and Inter-modality Attention (Liang, Chen, Zeng, Jiang, Cheng, Lu, EasyChair preprint 2024),
"Cross-modal Attention Network for Audio-Visual Event Localization", for supervised event localization.

Notation of the paper -> code (``docs/models.md``, section DIIA, has the full mapping and every choice where the paper
is silent):

* audio-guided visual attention "in spatial and channel dimensions" (Sec. 3.2): ``AudioGuidedSpatialChannelAttention``
  (channel attention ``(1 + M^c) * v``, then spatial attention ``sum_i alpha_i v_i``), followed by one linear layer per
  modality to the common width ``d`` of the DIIA module.
* MHA (Eq. 1) with the output projection of multi-head attention: ``MultiHeadAttention``; MHA followed by the FFN of
  Eq. 2 (residual + LayerNorm around each, as the Transformer of Fig. 3 / [16]): ``AttentionBlock``.
* conditional gates ``G = sigma(Avg_pool(X) W)`` (Eq. 7-8) and ``X_hat = (1 + G_other) * X`` (Eq. 5-6):
  ``ConditionalGate``.
* dynamic intra-modality attention ``FFN(MHA(X_hat; X_hat; X))`` (Eq. 3-4) and inter-modality attention
  ``FFN(MHA(V_intra; A_intra; A_intra))``, ``FFN(MHA(A_intra; V_intra; V_intra))`` (Eq. 9-10): ``DIIABlock``.
* averaged fusion ``F_va = (V_inter W^v + A_inter W^a) / 2`` (Eq. 11), two FC layers, softmax cross-entropy (Eq. 12):
  ``DIIA.classify`` and ``DIIA.loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avepipe.models.layers import lengths_from_mask, masked_cross_entropy, masked_mean, zero_padded
from avepipe.models.registry import register

NUM_CLASSES = 29


class AudioGuidedSpatialChannelAttention(nn.Module):
    """Audio-guided channel then spatial attention over a pool5 map, per second (CMRAN's AGSCA design).

    For one second with cells ``v_i`` (Dv each) and audio ``a``:

    * channel: ``s = mean_i(ReLU(U_a^c a) * ReLU(U_v^c v_i))``, ``M^c = sigma(W_2 ReLU(W_1 s))`` (Dv),
      ``v~_i = (1 + M^c) * v_i``;
    * spatial: ``x_i = tanh(w_s . (ReLU(U_v^s v~_i) * ReLU(U_a^s a)) + b_s)``, ``alpha = softmax_i(x)``, output
      ``sum_i alpha_i v~_i`` (Dv).

    Accepts visual [B, T, S, S, Dv] or [B, T, N, Dv] and audio [B, T, Da]. Returns (attended [B, T, Dv], channel map
    ``M^c`` [B, T, Dv], spatial weights ``alpha`` [B, T, N]).
    """

    def __init__(self, visual_dim: int, audio_dim: int, channel_hidden: int = 512, channel_bottleneck: int = 256,
                 spatial_hidden: int = 256):
        super().__init__()
        self.channel_audio = nn.Linear(audio_dim, channel_hidden)  # U_a^c
        self.channel_visual = nn.Linear(visual_dim, channel_hidden)  # U_v^c
        self.channel_squeeze = nn.Linear(channel_hidden, channel_bottleneck)  # W_1
        self.channel_excite = nn.Linear(channel_bottleneck, visual_dim)  # W_2
        self.spatial_audio = nn.Linear(audio_dim, spatial_hidden)  # U_a^s
        self.spatial_visual = nn.Linear(visual_dim, spatial_hidden)  # U_v^s
        self.spatial_score = nn.Linear(spatial_hidden, 1)  # w_s, b_s

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if visual.dim() == 5:
            visual = visual.flatten(2, 3)
        guide = F.relu(self.channel_audio(audio)).unsqueeze(2)  # [B, T, 1, Hc]
        squeezed = (guide * F.relu(self.channel_visual(visual))).mean(2)  # [B, T, Hc]
        channel_map = torch.sigmoid(self.channel_excite(F.relu(self.channel_squeeze(squeezed))))  # [B, T, Dv]
        visual = (1 + channel_map.unsqueeze(2)) * visual  # [B, T, N, Dv]
        joint = F.relu(self.spatial_visual(visual)) * F.relu(self.spatial_audio(audio)).unsqueeze(2)
        weights = torch.tanh(self.spatial_score(joint).squeeze(-1)).softmax(-1)  # [B, T, N]
        attended = (weights.unsqueeze(-1) * visual).sum(2)
        return attended, channel_map, weights


class MultiHeadAttention(nn.Module):
    """Eq. 1 per head, ``softmax(Q W_Q (K W_K)^T / sqrt(d_k)) V W_V`` with ``d_k = d / heads``, heads concatenated and
    projected by ``W_O`` (multi-head attention of [16]). All four projections are bias-free, as Eq. 1 writes them.

    forward(query [B, Q, d], key [B, M, d], value [B, M, d], key_mask bool [B, M], >= 1 True per row) ->
    (output [B, Q, d], attention weights [B, heads, Q, M], exactly 0 on keys outside ``key_mask``).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"feature dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(dim, dim, bias=False)  # W_Q (all heads side by side)
        self.key = nn.Linear(dim, dim, bias=False)  # W_K
        self.value = nn.Linear(dim, dim, bias=False)  # W_V
        self.out = nn.Linear(dim, dim, bias=False)  # W_O

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        return x.view(b, m, self.heads, d // self.heads).transpose(1, 2)  # [B, h, M, d_k]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self._split(self.query(query)), self._split(self.key(key)), self._split(self.value(value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).flatten(2)), weights


class AttentionBlock(nn.Module):
    """``FFN(MHA(query; key; value))`` (Eq. 1-2) in the Transformer arrangement of Fig. 3 / [16]:
    ``x = LN(query + drop(MHA))``, ``out = LN(x + drop(FFN(x)))``, ``FFN(x) = ReLU(x W_1 + b_1) W_2 + b_2``.

    ``residual`` replaces ``query`` in the first skip connection (the intra-modality block adds the un-gated features).
    Returns (output [B, Q, d], attention weights [B, heads, Q, M]).
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.attention = MultiHeadAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Linear(ff_dim, dim))
        self.norm_attention, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attention(query, key, value, key_mask)
        x = self.norm_attention((query if residual is None else residual) + self.drop(attended))
        return self.norm_ffn(x + self.drop(self.ffn(x))), weights


class ConditionalGate(nn.Module):
    """Eq. 5-8: ``G = sigma(Avg_pool(source) W)`` (one gate per video, Avg_pool over the real seconds), then
    ``target_hat = (1 + G) * target`` on every second. ``W`` is bias-free, as Eq. 7-8 write it."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Linear(dim, dim, bias=False)

    def gate(self, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.weight(masked_mean(source, mask)))  # [B, d]

    def forward(self, target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (1 + self.gate(source, mask).unsqueeze(1)) * target


class DIIABlock(nn.Module):
    """Dynamic intra-modality attention (Eq. 3-8) followed by inter-modality attention both ways (Eq. 9-10).

    forward(visual [B, T, d], audio [B, T, d], mask [B, T]) -> (V_inter, A_inter, attention weights by name).
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.gate_from_audio = ConditionalGate(dim)  # G_A, gates the visual queries / keys (Eq. 5, 8)
        self.gate_from_visual = ConditionalGate(dim)  # G_V, gates the audio queries / keys (Eq. 6, 7)
        self.visual_intra = AttentionBlock(dim, heads, ff_dim, dropout)
        self.audio_intra = AttentionBlock(dim, heads, ff_dim, dropout)
        self.visual_inter = AttentionBlock(dim, heads, ff_dim, dropout)
        self.audio_inter = AttentionBlock(dim, heads, ff_dim, dropout)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        visual_hat = self.gate_from_audio(visual, audio, mask)
        audio_hat = self.gate_from_visual(audio, visual, mask)
        # Gated queries and keys, original values (Eq. 3-4); the skip connection carries the original features too.
        visual_intra, w_vv = self.visual_intra(visual_hat, visual_hat, visual, mask, residual=visual)
        audio_intra, w_aa = self.audio_intra(audio_hat, audio_hat, audio, mask, residual=audio)
        visual_inter, w_va = self.visual_inter(visual_intra, audio_intra, audio_intra, mask)  # Eq. 9
        audio_inter, w_av = self.audio_inter(audio_intra, visual_intra, visual_intra, mask)  # Eq. 10
        weights = {"visual_intra": w_vv, "audio_intra": w_aa, "visual_inter": w_va, "audio_inter": w_av}
        return visual_inter, audio_inter, weights


@register(
    "diia",
    tasks=("supervised",),
    paper="Liang, Chen, Zeng, Jiang, Cheng, Lu. Cross-modal Attention Network for Audio-Visual Event Localization. "
    "EasyChair preprint 2024",
    default_config={
        "model": {
            "visual_dim": 512,  # VGG-19 pool5 7x7x512 and VGGish 128 (Sec. 4.2)
            "audio_dim": 128,
            "channel_hidden": 512,  # audio-guided spatial-channel attention: CMRAN's widths (the paper is silent)
            "channel_bottleneck": 256,
            "spatial_hidden": 256,
            "dim": 256,  # DIIA width, heads: CMRAN's relation modules (d_model 256, 4 heads); FFN 4 d as in [16]
            "heads": 4,
            "ff_dim": 1024,
            "dropout": 0.1,
            "blocks": 1,  # one DIIA block (intra then inter) as Fig. 2 draws it
        },
        # Sec. 4.2: Adam, batch 128, lr 7e-4 halved at epochs 10, 20 and 30. The epoch count is not given: 40 gives the
        # last rate as many epochs as the others.
        "train": {"optimizer": "adam", "lr": 7e-4, "batch_size": 128, "epochs": 40, "lr_milestones": [10, 20, 30],
                  "lr_gamma": 0.5},
    },
    published={"supervised": 78.4, "selection": "unknown", "source": "DIIA Table 1 (no public code found)"},
)
class DIIA(nn.Module):
    def __init__(
        self,
        task: str,
        visual_dim: int = 512,
        audio_dim: int = 128,
        channel_hidden: int = 512,
        channel_bottleneck: int = 256,
        spatial_hidden: int = 256,
        dim: int = 256,
        heads: int = 4,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        blocks: int = 1,
    ):
        super().__init__()
        if task != "supervised":
            raise ValueError(f"DIIA supports the supervised task only, not {task!r}")
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        self.attention = AudioGuidedSpatialChannelAttention(visual_dim, audio_dim, channel_hidden, channel_bottleneck,
                                                            spatial_hidden)
        self.visual_embed = nn.Linear(visual_dim, dim)
        self.audio_embed = nn.Linear(audio_dim, dim)
        self.blocks = nn.ModuleList(DIIABlock(dim, heads, ff_dim, dropout) for _ in range(blocks))
        self.fuse_visual = nn.Linear(dim, dim)  # W_inter^v (Eq. 11)
        self.fuse_audio = nn.Linear(dim, dim)  # W_inter^a
        self.classifier = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, NUM_CLASSES))  # two FC layers

    def encode(self, visual: torch.Tensor, audio: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Attended, embedded features through the DIIA blocks -> (V_inter, A_inter [B, T, d], weights per block)."""
        lengths_from_mask(mask)  # validates the prefix mask
        # Zeroed padding: nothing non-finite can reach a computation, and padded keys are masked in every attention.
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        attended, _, _ = self.attention(visual, audio)
        v, a = self.visual_embed(attended), self.audio_embed(audio)
        weights = []
        for block in self.blocks:
            v, a, w = block(v, a, mask)
            weights.append(w)
        return v, a, weights

    def classify(self, visual_inter: torch.Tensor, audio_inter: torch.Tensor) -> torch.Tensor:
        fused = 0.5 * (self.fuse_visual(visual_inter) + self.fuse_audio(audio_inter))  # Eq. 11
        return self.classifier(fused)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        v, a, _ = self.encode(visual, audio, mask)
        return {"segment_logits": self.classify(v, a)}

    def predict(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return outputs["segment_logits"].argmax(-1)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        # Eq. 12 up to its constant 1/C: softmax cross-entropy averaged over the real seconds.
        return masked_cross_entropy(outputs["segment_logits"], batch["labels"], batch["mask"])
