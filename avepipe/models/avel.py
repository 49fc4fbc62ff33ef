"""AVEL: Tian et al., "Audio-Visual Event Localization in Unconstrained Videos", ECCV 2018.

Audio-guided visual attention turns each second's 7x7 pool5 map into one visual vector; one BiLSTM per modality models
time; the two streams are fused per second (concatenation + 2-layer MLP, or a DMRN block) and classified into 29
classes. The weak variant pools the per-second scores over the video (MIL) and learns from video labels only.
See docs/models.md for the equation -> code map and every default's source.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avepipe.models.layers import (
    DMRN,
    AudioGuidedVisualAttention,
    MaskedLSTM,
    masked_cross_entropy,
    mil_pool,
    softmax_margin_loss,
    zero_padded,
)
from avepipe.models.registry import register

NUM_CLASSES = 29
BACKGROUND = 28

DEFAULT_CONFIG = {
    "model": {
        "visual_dim": 512,
        "audio_dim": 128,
        "att_hidden": 512,  # U_v / U_a embedding width (released code: hidden_size=512)
        "att_dim": 49,  # width of the additive-attention space (paper: k = 49)
        "lstm_hidden": 128,  # per direction (released code: hidden_dim=128)
        "classifier_hidden": 64,  # concat head: Linear(4h, 64) - ReLU - Linear(64, 29) (released code)
        "fusion": "concat",  # or "dmrn"
        "mil_pooling": "max",  # weak task; released weak model max-pools the per-second scores
        "attention_form": "paper",  # "released": W_a u_a added along the position axis (see layers)
        "init": "pytorch",  # "xavier": Xavier-uniform weights of every Linear, as att_Net.init_weights
        "loss": "paper",  # "released": multi-label soft margin on the softmax probabilities
    },
    "train": {
        "optimizer": "adam",
        "lr": 1e-3,
        "batch_size": 64,
        "epochs": 300,  # released supervised script (its weak script uses 250)
        # Released scripts decay lr x0.1 every 15000 iterations; with 3339 training videos / 64 that is epoch ~288.
        "lr_step": 288,
        "lr_gamma": 0.1,
    },
}


# What YapengTian/AVE-ECCV18 does (models.py, models_weakly.py, supervised_main.py, weak_supervised_main.py); the
# table with file and line is in docs/models.md, "Presets".
RELEASED = {
    "model": {"attention_form": "released", "init": "xavier", "loss": "released"},
    # dataloader.py get_batch(i) in a ``for i in range(len // batch_size)`` loop: the stored order every epoch, no
    # shuffling, the leftover rows dropped (data.tasks.batches).
    "train": {"batch_order": "released"},
    # weak_supervised_main.py: 250 epochs and StepLR(15000 iterations) that never fires within them (3,517 // 64 = 54
    # iterations per epoch on 3,339 + 178 videos: the last 61 background videos are never seen): no lr decay.
    "tasks": {"weak": {"train": {"epochs": 250, "lr_step": None}}},
}


@register(
    "avel",
    tasks=("supervised", "weak"),
    paper="Tian, Shi, Li, Duan, Xu. Audio-Visual Event Localization in Unconstrained Videos. ECCV 2018",
    default_config=DEFAULT_CONFIG,
    presets={"released": RELEASED},
    published={"supervised": 72.7, "weak": 66.7, "selection": "test",
               "source": "AVEL ECCV18 Table 1 (released supervised_main.py val() reads the test order)"},
)
class AVEL(nn.Module):
    def __init__(
        self,
        task: str,
        *,
        visual_dim: int = 512,
        audio_dim: int = 128,
        att_hidden: int = 512,
        att_dim: int = 49,
        lstm_hidden: int = 128,
        classifier_hidden: int = 64,
        fusion: str = "concat",
        mil_pooling: str = "max",
        attention_form: str = "paper",
        init: str = "pytorch",
        loss: str = "paper",
    ):
        super().__init__()
        if task not in ("supervised", "weak"):
            raise ValueError(f"AVEL supports 'supervised' and 'weak', not {task!r}")
        if init not in ("pytorch", "xavier") or loss not in ("paper", "released"):
            raise ValueError(f"unknown init {init!r} / loss {loss!r} (init: pytorch, xavier; loss: paper, released)")
        self.loss_form = loss
        if fusion not in ("concat", "dmrn"):
            raise ValueError(f"unknown fusion {fusion!r} (expected 'concat' or 'dmrn')")
        if mil_pooling not in ("max", "mean"):
            raise ValueError(f"unknown MIL pooling {mil_pooling!r} (expected 'max' or 'mean')")
        self.task, self.fusion, self.mil_pooling = task, fusion, mil_pooling
        self.attention = AudioGuidedVisualAttention(visual_dim, audio_dim, att_hidden, att_dim, attention_form)
        self.audio_lstm = MaskedLSTM(audio_dim, lstm_hidden, bidirectional=True)
        self.visual_lstm = MaskedLSTM(visual_dim, lstm_hidden, bidirectional=True)
        stream_dim = 2 * lstm_hidden
        if fusion == "concat":
            self.head = nn.Sequential(
                nn.ReLU(), nn.Linear(2 * stream_dim, classifier_hidden), nn.ReLU(),
                nn.Linear(classifier_hidden, NUM_CLASSES),
            )
        else:
            self.dmrn = DMRN(stream_dim, shared_update=False, combine="mean")
            self.head = nn.Linear(stream_dim, NUM_CLASSES)
        if init == "xavier":  # att_Net.init_weights: the attention and classifier weights (biases and LSTMs stay)
            for module in [*self.attention.modules(), *self.head.modules()]:
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        attended, weights = self.attention(visual, audio)
        h_audio, _ = self.audio_lstm(audio, mask)
        h_visual, _ = self.visual_lstm(attended, mask)
        if self.fusion == "concat":
            logits = self.head(torch.cat([h_audio, h_visual], -1))
        else:
            logits = self.head(self.dmrn(h_audio, h_visual))
        out = {"segment_logits": logits, "attention": weights}
        if self.task == "weak":
            out["video_logits"] = mil_pool(logits, mask, self.mil_pooling)
        return out

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        if self.loss_form == "released":
            return released_loss(outputs, batch, task)
        if task == "supervised":
            return masked_cross_entropy(outputs["segment_logits"], batch["labels"], batch["mask"])
        if task == "weak":
            # Video labels only: softmax cross-entropy of the MIL-pooled scores against the video category.
            return nn.functional.cross_entropy(outputs["video_logits"], batch["video_label"])
        raise ValueError(f"AVEL has no loss for task {task!r}")

    def predict(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return outputs["segment_logits"].argmax(-1)


def released_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The released code's loss: ``nn.MultiLabelSoftMarginLoss`` applied to softmax *probabilities* (the network ends
    in ``F.softmax``) against one-hot targets: per second in supervised_main.py (here averaged over the real seconds),
    per video on the softmax of the max-pooled scores in weak_supervised_main.py / models_weakly.py."""
    if task == "supervised":
        probs, target = outputs["segment_logits"].softmax(-1), F.one_hot(batch["labels"], NUM_CLASSES)
        per_second = F.multilabel_soft_margin_loss(probs.flatten(0, 1), target.flatten(0, 1).float(), reduction="none")
        mask = batch["mask"].flatten()
        return (per_second * mask).sum() / mask.sum()
    if task == "weak":
        return softmax_margin_loss(outputs["video_logits"], batch["video_label"])
    raise ValueError(f"AVEL has no loss for task {task!r}")
