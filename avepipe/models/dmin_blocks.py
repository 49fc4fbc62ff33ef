"""Blocks of DMIN / DCMR (Liu, Quan, Wang, Liu, Liu, Yan, "Dense Modality Interaction Network for Audio-Visual Event
Localization", IEEE TMM 2022). Equation numbers are the paper's.

* :class:`AudioGuidedTripletAttention` (AGTA, Eq. 1-8): audio-guided channel attention, MFB-based spatial correlation,
  spatial-wise BiLSTM temporal correlation, spatial softmax.
* :func:`full_channel_pair_scores` (FCPP / DFA, Eq. 12-13) and :class:`AttentionBlock`, which is the transformer
  encoder layer of the intra-modality attention (Eq. 9-10), the dense inter-modality attention DIMA (Eq. 11) and the
  audio-visual fusion attention (Eq. 14) depending on its arguments.
* :func:`sliding_query_weights`: DCMR's sliding cross-matching (Eq. 19) reduced to one weight per candidate second.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avepipe.models.layers import MaskedLSTM

# ---- AGTA (Sec. IV-A) ------------------------------------------------------------------------------------------------


class ChannelAttention(nn.Module):
    """Eq. 1: ``M^C = sigma(W_2 ReLU(W_1 AVP(ReLU(Phi_a^c a) * ReLU(Phi_v^c v))))``, one weight per visual channel.

    The paper writes ``Phi_a^c`` as d_a x d_a, which cannot be multiplied element-wise with a d_v-wide visual feature;
    the audio is projected to d_v (as in the released code)."""

    def __init__(self, visual_dim: int, audio_dim: int, bottleneck: int):
        super().__init__()
        self.audio = nn.Linear(audio_dim, visual_dim)  # Phi_a^c
        self.visual = nn.Linear(visual_dim, visual_dim)  # Phi_v^c
        self.squeeze = nn.Linear(visual_dim, bottleneck)  # W_1
        self.excite = nn.Linear(bottleneck, visual_dim)  # W_2

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """audio [B, T, Da], visual [B, T, N, Dv] -> M^C [B, T, Dv]."""
        joint = (F.relu(self.audio(audio)).unsqueeze(2) * F.relu(self.visual(visual))).mean(2)  # AVP over positions
        return torch.sigmoid(self.excite(F.relu(self.squeeze(joint))))


def signed_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Power normalisation ``sign(x) sqrt(|x|)`` (Eq. 4) with a finite gradient at 0.

    ``sqrt`` has an infinite derivative at 0 and MFB outputs are often exactly 0 (ReLU inputs); writing it as
    ``sqrt(relu(x)) - sqrt(relu(-x))`` gives the same values while ReLU's backward masks the infinite factor to 0."""
    return torch.sqrt(F.relu(x)) - torch.sqrt(F.relu(-x))


class MFBCorrelation(nn.Module):
    """Eq. 3-4: ``M^S = L2(power(D(SP(ReLU(Phi^T a) * ReLU(Psi^T v^s), k))))`` per spatial position (shared weights).

    ``SP(f, k)`` sums each run of ``k`` consecutive elements of the ``k d_o``-wide product (kernel k, stride k)."""

    def __init__(self, visual_dim: int, audio_dim: int, out_dim: int, factor: int, dropout: float,
                 dropout_at: str = "pooled"):
        super().__init__()
        if dropout_at not in ("pooled", "product"):
            raise ValueError(f"unknown MFB dropout place {dropout_at!r} (expected 'pooled' or 'product')")
        # "pooled": D(SP(.)) as Eq. 4 writes it; "product": the released MFB (supv_models.py,
        # New_Audio_Guided_Attention.MFB: ``F.dropout(av, 0.1)`` on the k d_o-wide product, before the sum pooling)
        self.out_dim, self.factor, self.dropout_at = out_dim, factor, dropout_at
        self.audio = nn.Linear(audio_dim, factor * out_dim)  # Phi
        self.visual = nn.Linear(visual_dim, factor * out_dim)  # Psi
        self.dropout = nn.Dropout(dropout)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """audio [B, T, Da], visual [B, T, N, Dv] -> [B, T, N, d_o] (unit L2 norm per position)."""
        joint = F.relu(self.audio(audio)).unsqueeze(2) * F.relu(self.visual(visual))
        if self.dropout_at == "product":
            joint = self.dropout(joint)
        pooled = joint.unflatten(-1, (self.out_dim, self.factor)).sum(-1)
        if self.dropout_at == "pooled":
            pooled = self.dropout(pooled)
        return F.normalize(signed_sqrt(pooled), dim=-1)


class SpatialTemporalCorrelation(nn.Module):
    """Eq. 5-6: ``a^P = ReLU(Phi_a a)``, ``v^P = ReLU(Phi_v v^C)``; for every spatial position s a BiLSTM runs over the
    seconds on ``[v^{P,s}_t + a^P_t, a^P_t]`` and returns the d_o-wide ``M^{T,s}_t`` (d_o / 2 per direction)."""

    def __init__(self, visual_dim: int, audio_dim: int, out_dim: int, layers: int):
        super().__init__()
        if out_dim % 2:
            raise ValueError(f"AGTA width d_o={out_dim} must be even (a BiLSTM of d_o / 2 per direction)")
        self.audio = nn.Linear(audio_dim, out_dim)  # Phi_a
        self.visual = nn.Linear(visual_dim, out_dim)  # Phi_v
        self.lstm = MaskedLSTM(2 * out_dim, out_dim // 2, bidirectional=True, num_layers=layers)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """audio [B, T, Da], visual [B, T, N, Dv], mask [B, T] -> [B, T, N, d_o]."""
        b, t, n, _ = visual.shape
        a = F.relu(self.audio(audio)).unsqueeze(2).expand(-1, -1, n, -1)
        v = F.relu(self.visual(visual))
        x = torch.cat([v + a, a], -1).transpose(1, 2).reshape(b * n, t, -1)  # one sequence per (video, position)
        out, _ = self.lstm(x, mask.repeat_interleave(n, 0))
        return out.reshape(b, n, t, -1).transpose(1, 2)


class AudioGuidedTripletAttention(nn.Module):
    """AGTA (Eq. 1-8). forward(visual [B, T, S, S, Dv] or [B, T, N, Dv], audio [B, T, Da], mask [B, T]) ->
    (v^S [B, T, Dv], spatial map M^S [B, T, N], channel map M^C [B, T, Dv])."""

    def __init__(self, visual_dim: int, audio_dim: int, *, bottleneck: int, out_dim: int, factor: int,
                 mfb_dropout: float, lstm_layers: int, channel_residual: bool = False, mfb_dropout_at: str = "pooled"):
        super().__init__()
        # channel_residual: Eq. 2 as released (supv_models.py, New_Audio_Guided_Attention.forward:
        # ``raw_visual_feature * (channel_att_maps + 1)``), v^C = (1 + M^C) * v instead of M^C * v.
        self.channel_residual = channel_residual
        self.channel = ChannelAttention(visual_dim, audio_dim, bottleneck)
        self.mfb = MFBCorrelation(visual_dim, audio_dim, out_dim, factor, mfb_dropout, mfb_dropout_at)
        self.temporal = SpatialTemporalCorrelation(visual_dim, audio_dim, out_dim, lstm_layers)
        self.score = nn.Linear(out_dim, 1)  # W_3

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor):
        if visual.dim() == 5:
            visual = visual.flatten(2, 3)
        channel_map = self.channel(audio, visual)
        visual_c = (channel_map + 1 if self.channel_residual else channel_map).unsqueeze(2) * visual  # Eq. 2
        joint = self.mfb(audio, visual_c) + self.temporal(audio, visual_c, mask)
        spatial_map = torch.tanh(self.score(joint)).squeeze(-1).softmax(-1)  # Eq. 7, softmax over positions
        attended = (spatial_map.unsqueeze(-1) * visual_c).sum(2)  # Eq. 8
        return attended, spatial_map, channel_map


# ---- dense fusion attention and the attention blocks (Sec. IV-B..D) ------------------------------------------------


def full_channel_pair_scores(query: torch.Tensor, key: torch.Tensor, alpha: float) -> torch.Tensor:
    """FCPP of every (query, key) pair (Eq. 12-13): query [..., Tq, d], key [..., Tk, d] -> [..., Tq, Tk].

    ``FCPP(q, k) = sum_{m,n} W_mn q_m k_n`` with ``W_mm = alpha`` and ``W_mn = beta = (1 - alpha) / (d - 1)`` for
    m != n. Split the double sum into all pairs and the diagonal correction:

        sum_{m,n} W_mn q_m k_n = beta sum_{m,n} q_m k_n + (alpha - beta) sum_m q_m k_m
                               = beta (sum_m q_m)(sum_n k_n) + (alpha - beta) q . k

    so the d x d outer product of each pair is never built: one matrix product plus a rank-1 term.
    """
    d = query.shape[-1]
    if d < 2:
        raise ValueError("the full channel pair product needs at least 2 channels per head")
    beta = (1.0 - alpha) / (d - 1)
    rank_one = query.sum(-1, keepdim=True) * key.sum(-1).unsqueeze(-2)
    return beta * rank_one + (alpha - beta) * (query @ key.transpose(-1, -2))


class DenseAttention(nn.Module):
    """Multi-head attention of ``query`` over the keys ``cat(x, y)`` along time (Eq. 9, 11, 14).

    Scores against ``x`` are scaled dot products; against ``y`` they are FCPP / sqrt(d_k) when ``dense_alpha`` is set
    (DIMA's dense fusion attention) and scaled dot products otherwise. One softmax runs over all 2T keys; keys outside
    ``x_mask`` / ``y_mask`` get no weight. ``W^Q, W^K, W^V`` have no bias (Eq. 9, 11).
    """

    def __init__(self, dim: int, heads: int, dropout: float, dense_alpha: float | None = None,
                 dense_scale: str = "paper", bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        if dense_scale not in ("paper", "released"):
            raise ValueError(f"unknown DFA scale {dense_scale!r} (expected 'paper' or 'released')")
        # "released": the released FCPP is the mean over the d_k channel rolls (supv_models.py,
        # multi_head_attention_forward: ``avcat.mean(-1)``), i.e. FCPP / d_k, before the usual 1 / sqrt(d_k).
        self.heads, self.dense_alpha, self.dense_scale = heads, dense_alpha, dense_scale
        # bias=True: the released attentions (nn.MultiheadAttention and supv_models.py MultiHead) have an
        # ``in_proj_bias`` on W^Q, W^K, W^V; Eq. 9 and 11 write them without.
        self.query = nn.Linear(dim, dim, bias=bias)
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim)  # W^O
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, h, T, d_k]

    def forward(self, query, x, x_mask, y=None, y_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output [B, Tq, D], attention weights [B, h, Tq, Tx + Ty])."""
        q = self._heads(self.query(query))
        keys = x if y is None else torch.cat([x, y], 1)
        k, v = self._heads(self.key(keys)), self._heads(self.value(keys))
        tx = x.shape[1]
        scores = q @ k[:, :, :tx].transpose(-1, -2)  # N_{Q, K_x}
        key_mask = x_mask
        if y is not None:
            k_y = k[:, :, tx:]
            if self.dense_alpha is None:
                scores_y = q @ k_y.transpose(-1, -2)
            else:
                scores_y = full_channel_pair_scores(q, k_y, self.dense_alpha)  # N_{Q, K_y} = DFA(Q, K_y)
                if self.dense_scale == "released":
                    scores_y = scores_y / q.shape[-1]
            scores = torch.cat([scores, scores_y], -1)
            key_mask = torch.cat([x_mask, y_mask], 1)
        scores = scores / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)
        out = (self.dropout(weights) @ v).transpose(1, 2).flatten(2)
        return self.out(out), weights


class AttentionBlock(nn.Module):
    """``LayerNorm(query + Attention)``, then (``feed_forward``) ``LayerNorm(h + W_5 ReLU(W_4 h))`` (Eq. 10).

    * intra-modality encoder layer (Eq. 9-10): ``block(x, x, mask)``;
    * DIMA (Eq. 11 + "the same operations" of Eq. 10): ``dense_alpha`` set, ``block(x, x, x_mask, y_self, y_mask)``;
    * audio-visual fusion (Eq. 14): no feed-forward, ``block(a_cross * v_cross, a_cross, mask, v_cross, mask)``.
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, *, dense_alpha: float | None = None,
                 feed_forward: bool = True, dense_scale: str = "paper", bias: bool = False):
        super().__init__()
        self.attention = DenseAttention(dim, heads, dropout, dense_alpha, dense_scale, bias)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = None
        if feed_forward:
            self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
            self.norm2 = nn.LayerNorm(dim)

    def forward(self, query, x, x_mask, y=None, y_mask=None) -> torch.Tensor:
        attended, _ = self.attention(query, x, x_mask, y, y_mask)
        h = self.norm1(query + self.drop(attended))
        if self.ff is not None:
            h = self.norm2(h + self.drop(self.ff(h)))
        return h


class Encoder(nn.Module):
    """A stack of intra-modality self-attention layers (Eq. 9-10) with a key mask."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, layers: int, bias: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(AttentionBlock(dim, heads, ff_dim, dropout, bias=bias) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, x, mask)
        return x


# ---- DCMR cross-matching (Sec. V) -----------------------------------------------------------------------------------


def sliding_query_product(query_values: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The released sliding cross-matching (DCMR/model/main_model_a2v.py, ``AudioVideoInter.forward``: for every
    window k, ``video_feat[k:k+t] *= audio_mean``): candidate second t is multiplied by ``q_{t-k}`` once for every
    window k covering it, so its weight is the *product* of those ``q_{t-k}`` (1 where no window covers it).
    Same arguments as :func:`sliding_query_weights`; returns [B, T] (0 on padded seconds)."""
    b, t = query_values.shape
    lengths, k_len = mask.sum(1), query.sum(1)
    steps = torch.arange(t, device=query.device)
    order = torch.argsort((~query).to(torch.int8), dim=1, stable=True)
    sequence = torch.where(steps < k_len[:, None], query_values.gather(1, order), 0.0)
    offset = steps[:, None] - steps[None, :]
    valid = (offset >= 0) & (offset < k_len[:, None, None]) & (steps <= (lengths - k_len)[:, None, None])
    picked = sequence.gather(1, offset.clamp(0, t - 1).reshape(1, -1).expand(b, -1)).view(b, t, t)
    product = torch.where(valid, picked, torch.ones_like(picked)).prod(-1)
    return torch.where(mask, product, 0.0)


def sliding_query_weights(query_values: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sliding cross-matching (Eq. 19) reduced to one weight per candidate second.

    ``query_values`` [B, T] are the channel means of the query modality's cross features; the K_b seconds marked in
    ``query`` [B, T] form the query sequence ``q_0..q_{K-1}`` (in time order). Window k (0 <= k <= L - K, L = real
    seconds) multiplies candidate second k + i by ``q_i``. Second t is covered by the windows
    ``max(0, t-K+1) <= k <= min(t, L-K)``; its weight is the mean of ``q_{t-k}`` over them, so that a linear classifier
    on ``weight_t * c_t`` equals the mean over windows of the per-window scores ``FC(q_{t-k} c_t)``.
    Returns [B, T] (0 on padded seconds).
    """
    b, t = query_values.shape
    lengths, k_len = mask.sum(1), query.sum(1)
    steps = torch.arange(t, device=query.device)
    order = torch.argsort((~query).to(torch.int8), dim=1, stable=True)  # query seconds first, in time order
    sequence = torch.where(steps < k_len[:, None], query_values.gather(1, order), 0.0)  # q_0..q_{K-1}, then 0
    offset = steps[:, None] - steps[None, :]  # [second t, window k] -> i = t - k
    valid = (offset >= 0) & (offset < k_len[:, None, None]) & (steps <= (lengths - k_len)[:, None, None])
    picked = sequence.gather(1, offset.clamp(0, t - 1).reshape(1, -1).expand(b, -1)).view(b, t, t)
    total = (picked * valid).sum(-1)
    return torch.where(mask, total / valid.sum(-1).clamp_min(1), 0.0)
