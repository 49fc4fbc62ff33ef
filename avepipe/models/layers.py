"""Building blocks shared by the AVE localization models.

Conventions: time is dimension 1, ``mask`` is bool [B, T] with True on real seconds, and padding is trailing (every
row of ``mask`` is a prefix of Trues with at least one True). :func:`lengths_from_mask` enforces this, so a hole in a
mask fails loudly instead of silently leaking through a recurrent layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# ---- masks and pooling -----------------------------------------------------------------------------------------------


def lengths_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Number of real seconds per row (long [B]); raises ValueError unless each row is a non-empty prefix."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [B, T], got {mask.dtype} {tuple(mask.shape)}")
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    # Both checks in one device->host read (on a GPU each read waits for the work queued before it).
    is_prefix, non_empty = torch.stack([(prefix == mask).all(), (lengths > 0).all()]).tolist()
    if not is_prefix:
        raise ValueError("mask must mark a prefix of real seconds in every row (padding only at the end)")
    if not non_empty:
        raise ValueError("every video needs at least one real second")
    return lengths


def zero_padded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, ...] with padded seconds set to 0 (so NaN/inf padding cannot reach any computation)."""
    keep = mask.reshape(mask.shape + (1,) * (x.dim() - 2))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real seconds of ``x`` [B, T, ...] -> [B, ...]."""
    count = mask.sum(1).clamp_min(1).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 2))
    return zero_padded(x, mask).sum(1) / count


def per_video_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-second values [B, T] averaged over each video's real seconds ((1/N) sum_t), then over the videos."""
    return masked_mean(values, mask).mean()


def event_category_loss(category_logits: torch.Tensor, video_label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of video-level logits over the 28 event classes [B, 28], averaged over the videos that have an
    event (``video_label`` != 28): background-only videos have no category."""
    has_event = video_label != category_logits.shape[-1]
    ce = F.cross_entropy(category_logits, video_label.clamp(max=category_logits.shape[-1] - 1), reduction="none")
    return (ce * has_event).sum() / has_event.sum().clamp(min=1)


def softmax_margin_loss(video_logits: torch.Tensor, video_label: torch.Tensor) -> torch.Tensor:
    """``nn.MultiLabelSoftMarginLoss()(softmax(video_logits), one-hot video_label)``: the weak loss of the released
    AVEL, DMIN and CMBS scripts (a multi-label loss applied to softmax *probabilities*; its gradient is small)."""
    target = F.one_hot(video_label, video_logits.shape[-1]).to(video_logits.dtype)
    return F.multilabel_soft_margin_loss(video_logits.softmax(-1), target)


def span_match_loss(match_logits: torch.Tensor, target_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CML loss: per-second BCE of the match logits [B, T] against the target span, ``per_video_mean`` over real
    seconds."""
    bce = F.binary_cross_entropy_with_logits(match_logits, target_mask.to(match_logits.dtype), reduction="none")
    return per_video_mean(bce, mask)


def cml_decode_scores(model: nn.Module, match_logits: torch.Tensor) -> torch.Tensor:
    """The per-second CML scores the max-contiguous-sum decoding adds up: ``sigma(match_logits)`` for models whose
    paper sums probabilities (``model.cml_decode == "sigmoid"``: DAM Sec. 3.3, M2N Sec. 3.6), the logits otherwise."""
    logits = match_logits.float()
    return torch.sigmoid(logits) if getattr(model, "cml_decode", "logits") == "sigmoid" else logits


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the real seconds of ``x`` [B, T, ...] -> [B, ...]."""
    keep = mask.reshape(mask.shape + (1,) * (x.dim() - 2))
    return x.masked_fill(~keep, float("-inf")).amax(1)


def mil_pool(segment_logits: torch.Tensor, mask: torch.Tensor, mode: str = "max") -> torch.Tensor:
    """Multiple-instance pooling of per-second scores [B, T, C] into video scores [B, C] over real seconds.

    ``max``: the bag score of a class is its best second (AVEL's released weak model); ``mean``: average of the
    per-second scores (AVSDN Eq. 3).
    """
    if mode == "max":
        return masked_max(segment_logits, mask)
    if mode == "mean":
        return masked_mean(segment_logits, mask)
    raise ValueError(f"unknown MIL pooling {mode!r} (expected 'max' or 'mean')")


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of per-second logits [B, T, C] against labels [B, T], averaged over real seconds only."""
    return F.cross_entropy(logits[mask], labels[mask])


# ---- attention -------------------------------------------------------------------------------------------------------


class AudioGuidedVisualAttention(nn.Module):
    """Tian et al. (ECCV18) audio-guided visual attention over the spatial positions of a pool5 map.

    Per second: ``u_v = ReLU(U_v v_i)`` for each position i, ``u_a = ReLU(U_a a)``,
    ``x_i = w_f . tanh(W_v u_v + W_a u_a)``, ``w = softmax_i(x)``, output ``sum_i w_i v_i`` (the raw visual features,
    so the output keeps ``visual_dim``). Accepts visual [B, T, S, S, Dv] or [B, T, N, Dv]; audio [B, T, Da].
    Returns (attended [B, T, Dv], weights [B, T, N]).

    ``form="released"`` is the attention of Tian's released code (AVE-ECCV18 models.py, ``att_Net.forward``:
    ``affine_v(v_t) + affine_g(a_t).unsqueeze(2)``): ``W_a u_a`` [att_dim] is broadcast along the *position* axis,
    ``x_i = w_f . tanh(W_v u_v,i + (W_a u_a)_i 1)``, so position i gets the i-th audio component; it needs
    ``att_dim`` = number of positions (49).
    """

    def __init__(self, visual_dim: int, audio_dim: int, hidden_dim: int = 512, att_dim: int = 49,
                 form: str = "paper"):
        super().__init__()
        if form not in ("paper", "released"):
            raise ValueError(f"unknown attention form {form!r} (expected 'paper' or 'released')")
        self.form = form
        self.embed_visual = nn.Linear(visual_dim, hidden_dim)  # U_v
        self.embed_audio = nn.Linear(audio_dim, hidden_dim)  # U_a
        self.project_visual = nn.Linear(hidden_dim, att_dim, bias=False)  # W_v
        self.project_audio = nn.Linear(hidden_dim, att_dim, bias=False)  # W_a
        self.score = nn.Linear(att_dim, 1, bias=False)  # w_f

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if visual.dim() == 5:
            visual = visual.flatten(2, 3)
        u_v = F.relu(self.embed_visual(visual))  # [B, T, N, H]
        u_a = F.relu(self.embed_audio(audio))  # [B, T, H]
        if self.form == "released":
            if self.project_audio.out_features != visual.shape[2]:
                raise ValueError(f"the released attention form needs att_dim = {visual.shape[2]} positions, "
                                 f"got {self.project_audio.out_features}")
            hidden = torch.tanh(self.project_visual(u_v) + self.project_audio(u_a).unsqueeze(-1))  # along positions
        else:
            hidden = torch.tanh(self.project_visual(u_v) + self.project_audio(u_a).unsqueeze(2))
        weights = self.score(hidden).squeeze(-1).softmax(-1)  # [B, T, N]
        attended = (weights.unsqueeze(-1) * visual).sum(2)
        return attended, weights


# ---- recurrence ------------------------------------------------------------------------------------------------------


class MaskedLSTM(nn.Module):
    """``nn.LSTM`` (batch_first) run on packed sequences so padded seconds never influence real ones.

    forward(x [B, T, D], mask [B, T], state=None) -> (outputs [B, T, H * directions] with zeros on padded seconds,
    (h_n, c_n) each [layers * directions, B, H] taken at each row's last real second). ``state`` is an optional
    initial (h_0, c_0) in the same layout.
    """

    def __init__(self, input_dim: int, hidden_dim: int, *, bidirectional: bool = True, num_layers: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                            bidirectional=bidirectional)
        self.output_dim = hidden_dim * (2 if bidirectional else 1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        lengths = lengths_from_mask(mask)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = self.lstm(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, (h_n, c_n)


# ---- fusion ----------------------------------------------------------------------------------------------------------


def _update_mlp(dim: int) -> nn.Sequential:
    # Two-layer update network as in the released AVEL DMRN (Linear-tanh-Linear, width kept).
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))


class DMRN(nn.Module):
    """Dual multimodal residual network block (Tian et al. ECCV18; AVSDN Eq. 2).

    ``m = (U_a(h_a) + U_v(h_v)) / 2``, ``h_a' = tanh(h_a + m)``, ``h_v' = tanh(h_v + m)``; output ``(h_a' + h_v') / 2``
    (``combine="mean"``, AVEL) or ``h_a' + h_v'`` (``combine="sum"``, AVSDN). ``shared_update=True`` uses one update
    network for both modalities (AVSDN writes a single g_theta); AVEL has separate U_a and U_v. Works on any [..., dim].
    """

    def __init__(self, dim: int, *, shared_update: bool = False, combine: str = "mean"):
        super().__init__()
        if combine not in ("mean", "sum"):
            raise ValueError(f"unknown DMRN combine {combine!r} (expected 'mean' or 'sum')")
        self.update_audio = _update_mlp(dim)
        self.update_visual = self.update_audio if shared_update else _update_mlp(dim)
        self.combine = combine

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        merged = 0.5 * (self.update_audio(audio) + self.update_visual(visual))
        fused = torch.tanh(audio + merged) + torch.tanh(visual + merged)
        return 0.5 * fused if self.combine == "mean" else fused
