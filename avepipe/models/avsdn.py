"""AVSDN: Lin, Li, Wang, "Dual-Modality Seq2Seq Network for Audio-Visual Event Localization", ICASSP 2019.

Encoder: one LSTM per modality; its (h, c) at the last real second is that modality's global representation.
Fusion (Eq. 2): DMRN-style residual fusion with one shared MLP g_theta, applied to the hidden and to the cell states;
the fused pair initialises the decoder. Decoder: one LSTM over the concatenated local features [a_t; v_t], then one FC
layer -> 29 logits per second. Weak task: average the per-second logits over the video (Eq. 3) and train on the video
label. See docs/models.md for the choices the paper leaves open.
"""

from __future__ import annotations

import torch
from torch import nn

from avepipe.models.layers import (
    DMRN,
    AudioGuidedVisualAttention,
    MaskedLSTM,
    masked_cross_entropy,
    masked_mean,
    mil_pool,
    zero_padded,
)
from avepipe.models.registry import register

NUM_CLASSES = 29
BACKGROUND = 28

DEFAULT_CONFIG = {
    "model": {
        "visual_dim": 512,
        "audio_dim": 128,
        "hidden": 128,  # encoder and decoder LSTM width (paper silent; AVEL's LSTM width)
        # The paper feeds global-pooled ResNet-152 vectors; on VGG-19 pool5 maps every re-run it is compared with
        # (AVEL's 72.7 / 66.7 and the 72.6 / 66.8 reproductions) uses AVEL's audio-guided attention, so that is the
        # default; "mean" (plain average pooling, as the paper's global pooling) stays an option.
        "visual_pool": "attention",
        "att_hidden": 512,
        "att_dim": 49,
        "mil_pooling": "mean",  # Eq. 3
        # Weak target (Sec. 1): Y = (1/T) sum_t y_t, the mean of the per-second one-hot labels (background share
        # included), scored against softmax(mean_t m_t) with binary cross-entropy (Sec. 2). "video-label": softmax
        # cross-entropy against the video's category only.
        "weak_target": "mean-labels",
    },
    "train": {
        # The paper gives no training schedule; these are AVEL's (its reference baseline and protocol).
        "optimizer": "adam",
        "lr": 1e-3,
        "batch_size": 64,
        "epochs": 300,
        "lr_step": 288,
        "lr_gamma": 0.1,
    },
}


@register(
    "avsdn",
    tasks=("supervised", "weak"),
    paper="Lin, Li, Wang. Dual-Modality Seq2Seq Network for Audio-Visual Event Localization. ICASSP 2019",
    default_config=DEFAULT_CONFIG,
    # No public code of AVSDN was found (docs/models.md, "Presets"): only the paper preset.
    published={"supervised": 75.4, "weak": 74.2, "selection": "unknown",
               "source": "AVSDN Tables 1-2 (ResNet-152 visual features; 72.6 / 66.8 with VGG-19 per DAM, DMIN)"},
)
class AVSDN(nn.Module):
    def __init__(
        self,
        task: str,
        *,
        visual_dim: int = 512,
        audio_dim: int = 128,
        hidden: int = 128,
        visual_pool: str = "attention",
        att_hidden: int = 512,
        att_dim: int = 49,
        mil_pooling: str = "mean",
        weak_target: str = "mean-labels",
    ):
        super().__init__()
        if task not in ("supervised", "weak"):
            raise ValueError(f"AVSDN supports 'supervised' and 'weak', not {task!r}")
        if visual_pool not in ("mean", "attention"):
            raise ValueError(f"unknown visual_pool {visual_pool!r} (expected 'mean' or 'attention')")
        if mil_pooling not in ("max", "mean"):
            raise ValueError(f"unknown MIL pooling {mil_pooling!r} (expected 'max' or 'mean')")
        if weak_target not in ("mean-labels", "video-label"):
            raise ValueError(f"unknown weak_target {weak_target!r} (expected 'mean-labels' or 'video-label')")
        self.task, self.visual_pool, self.mil_pooling, self.weak_target = task, visual_pool, mil_pooling, weak_target
        if visual_pool == "attention":
            self.attention = AudioGuidedVisualAttention(visual_dim, audio_dim, att_hidden, att_dim)
        self.audio_encoder = MaskedLSTM(audio_dim, hidden, bidirectional=False)
        self.visual_encoder = MaskedLSTM(visual_dim, hidden, bidirectional=False)
        # Eq. 2 for h; "the cell states can be fused like hidden states" -> a second block of the same form.
        self.fuse_hidden = DMRN(hidden, shared_update=True, combine="sum")
        self.fuse_cell = DMRN(hidden, shared_update=True, combine="sum")
        self.decoder = MaskedLSTM(audio_dim + visual_dim, hidden, bidirectional=False)
        self.classifier = nn.Linear(hidden, NUM_CLASSES)

    def _visual_vectors(self, visual: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.visual_pool == "attention":
            return self.attention(visual, audio)
        return visual.flatten(2, 3).mean(2), None

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        v, weights = self._visual_vectors(visual, audio)
        _, (h_a, c_a) = self.audio_encoder(audio, mask)
        _, (h_v, c_v) = self.visual_encoder(v, mask)
        state = (self.fuse_hidden(h_a, h_v), self.fuse_cell(c_a, c_v))  # each [1, B, hidden]
        decoded, _ = self.decoder(torch.cat([audio, v], -1), mask, state)
        logits = self.classifier(decoded)
        out = {"segment_logits": logits}
        if weights is not None:
            out["attention"] = weights
        if self.task == "weak":
            out["video_logits"] = mil_pool(logits, mask, self.mil_pooling)
        return out

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        if task == "supervised":
            return masked_cross_entropy(outputs["segment_logits"], batch["labels"], batch["mask"])
        if task == "weak":
            if self.weak_target == "mean-labels":
                return mean_label_bce(outputs["video_logits"], batch["labels"], batch["mask"])
            # Eq. 3: softmax of the averaged predictions, scored against the video label (one-hot cross-entropy).
            return nn.functional.cross_entropy(outputs["video_logits"], batch["video_label"])
        raise ValueError(f"AVSDN has no loss for task {task!r}")

    def predict(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return outputs["segment_logits"].argmax(-1)


def mean_label_bce(video_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AVSDN's weak loss: BCE between ``p = softmax(video_logits)`` (Eq. 3) and ``Y = (1/T) sum_t y_t`` (the mean of
    the per-second one-hot labels over the real seconds, background share included), averaged over the 29 classes
    and the videos. ``log(1 - p)`` is taken as ``log(sum of the other classes' p)``, finite even when p -> 1."""
    target = masked_mean(nn.functional.one_hot(labels, NUM_CLASSES).to(video_logits.dtype), mask)
    log_p = video_logits.log_softmax(-1)
    others = log_p.unsqueeze(-2).expand(-1, NUM_CLASSES, -1)
    eye = torch.eye(NUM_CLASSES, dtype=torch.bool, device=log_p.device)
    log_not_p = others.masked_fill(eye, float("-inf")).logsumexp(-1)
    return -(target * log_p + (1 - target) * log_not_p).mean()
