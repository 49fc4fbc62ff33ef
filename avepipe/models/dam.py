"""DAM: Dual Attention Matching (Wu, Zhu, Yan, Yang, ICCV 2019), for supervised event localization and CML.

Notation of the paper -> code (``docs/models.md``, section DAM, has the full mapping and every choice where the paper is
silent):

* local features ``f_t^A``, ``f_t^V``: ``audio_local`` / ``visual_local`` after the audio-guided visual attention
  (AVEL's low-level structure: BiLSTMs for SEL; per-second MLP embeddings for CML, as AVEL's cross-modal matching
  network).
* event-based global feature ``phi(S) = mean(self-att(F_E))`` (Eq. 1-4): ``GlobalEventEmbedding``.
* cross-modal dual matching ``p_t^A = sigma(phi^V . f_t^A)``, ``p_t^V = sigma(phi^A . f_t^V)`` (Eq. 5-6), their average
  ``p_t`` (Eq. 7): ``forward``; CML uses one direction (the query's global feature against the candidate's locals).
* SEL objective ``lambda * CE + (1 - lambda) * mean_t BCE`` (Eq. 8): ``loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avepipe.models.layers import (
    AudioGuidedVisualAttention,
    MaskedLSTM,
    event_category_loss,
    lengths_from_mask,
    masked_mean,
    per_video_mean,
    span_match_loss,
    zero_padded,
)
from avepipe.models.registry import register

NUM_CLASSES = 29
BACKGROUND = 28
# Score given to padded seconds in CML: far below any real score, finite so window sums and losses stay finite.
PAD_SCORE = -1e4


class GlobalEventEmbedding(nn.Module):
    """phi(S) = mean(self-att(F)) over the given seconds (Eq. 1-4).

    self-att is one Transformer encoder layer in the "default structure" of Vaswani et al. (multi-head scaled
    dot-product attention with bias-free W_q, W_k, W_v, residual + LayerNorm, ReLU feed-forward, dropout); keys outside
    ``valid`` are masked out and only ``valid`` seconds enter the mean, so nothing outside ``valid`` reaches phi.
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"feature dim {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], valid bool [B, T] (at least one True per row) -> phi [B, D]."""
        b, t, d = x.shape
        x = zero_padded(x, valid)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=valid[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        x = self.norm1(x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d))))
        x = self.norm2(x + self.drop(self.ff(x)))
        return masked_mean(x, valid)


def _embedding_mlp(input_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    # AVEL's cross-modal matching embedding: Dense(hidden) -> LeakyReLU(0.3) -> Dense(out), one per modality.
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.LeakyReLU(0.3), nn.Linear(hidden, out_dim))


def _dot(global_feature: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """phi [B, D] . f_t [B, T, D] -> [B, T] (the argument of sigma in Eq. 5-6)."""
    return torch.einsum("bd,btd->bt", global_feature, local)



@register(
    "dam",
    tasks=("supervised", "cml"),
    paper="Wu, Zhu, Yan, Yang. Dual Attention Matching for Audio-Visual Event Localization. ICCV 2019",
    default_config={
        "model": {
            "visual_dim": 512,
            "audio_dim": 128,
            "att_hidden": 512,  # AVEL's audio-guided attention sizes (paper: "same low-level structure as [30]")
            "att_dim": 49,
            "lstm_hidden": 128,  # SEL local features: AVEL's BiLSTMs, f_t is 2 * 128 = 256-d
            "cml_hidden": 128,  # CML local features: AVEL's matching MLP 128 -> 64
            "cml_dim": 64,
            "heads": 8,  # self-attention: Transformer defaults (h = 8, d_ff = 4 d, dropout 0.1)
            "ff_mult": 4,
            "dropout": 0.1,
            "lambda_category": 0.5,  # Eq. 8, best value in the paper's Fig. 5
        },
        # The paper gives no training recipe; these are AVEL's (Adam 1e-3, batch 64, 300 epochs, lr x0.1 once after
        # 15,000 iterations = epoch ~288 at 52 iterations per epoch on the 3,339-video train split).
        "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 64, "epochs": 300, "lr_step": 288, "lr_gamma": 0.1},
    },
    published={"supervised": 74.5, "cml-a2v": 47.1, "cml-v2a": 48.5, "cml-average": 47.8, "selection": "unknown",
               "source": "DAM Tables 1-2 (mean of three runs; no public code found)"},
)
class DAM(nn.Module):
    # CML: the max-contiguous sum adds the sigma scores (Sec. 3.3, "prediction scores", Eq. 5-6), not logits.
    cml_decode = "sigmoid"
    # --direction both: one DAM module trained on both directions at once with the BCE of Eq. 7 (Sec. 3.3 "we then
    # train the DAM module as discussed in Sec. 3.2"); evaluated in each direction.
    JOINT_DIRECTIONS = True
    def __init__(
        self,
        task: str,
        visual_dim: int = 512,
        audio_dim: int = 128,
        att_hidden: int = 512,
        att_dim: int = 49,
        lstm_hidden: int = 128,
        cml_hidden: int = 128,
        cml_dim: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        dropout: float = 0.1,
        lambda_category: float = 0.5,
    ):
        super().__init__()
        if task not in ("supervised", "cml"):
            raise ValueError(f"DAM supports the supervised and cml tasks, not {task!r}")
        self.task, self.lambda_category = task, lambda_category
        self.attention = AudioGuidedVisualAttention(visual_dim, audio_dim, att_hidden, att_dim)
        if task == "supervised":
            dim = 2 * lstm_hidden
            self.audio_local = MaskedLSTM(audio_dim, lstm_hidden)
            self.visual_local = MaskedLSTM(visual_dim, lstm_hidden)
        else:
            dim = cml_dim
            self.audio_local = _embedding_mlp(audio_dim, cml_hidden, cml_dim)
            self.visual_local = _embedding_mlp(visual_dim, cml_hidden, cml_dim)
        # One self-attention per modality: the paper writes one "self-att" in Eq. 3 and 4; separate weights are our
        # pick.
        self.audio_global = GlobalEventEmbedding(dim, heads, ff_mult * dim, dropout)
        self.visual_global = GlobalEventEmbedding(dim, heads, ff_mult * dim, dropout)
        if task == "supervised":
            # Event category from the fused global features; fusion = concatenation (the paper does not say).
            self.classifier = nn.Linear(2 * dim, NUM_CLASSES - 1)

    # ---- supervised event localization (Sec. 3.4) -------------------------------------------------------------------

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.task != "supervised":
            raise RuntimeError("this DAM was built for cml; call forward_cml")
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        f_a, _ = self.audio_local(audio, mask)
        f_v, _ = self.visual_local(self.attention(visual, audio)[0], mask)
        # SEL: self-attention over all real seconds, background included (the event region is unknown at test time).
        phi_a, phi_v = self.audio_global(f_a, mask), self.visual_global(f_v, mask)
        logit_a, logit_v = _dot(phi_v, f_a), _dot(phi_a, f_v)  # Eq. 5, 6 before the sigmoid
        # log p_t and log(1 - p_t) of Eq. 7, p_t = (sigma(x) + sigma(y)) / 2, computed stably in log space.
        log_event = torch.logaddexp(F.logsigmoid(logit_a), F.logsigmoid(logit_v)) - math.log(2.0)
        log_background = torch.logaddexp(F.logsigmoid(-logit_a), F.logsigmoid(-logit_v)) - math.log(2.0)
        category_logits = self.classifier(torch.cat([phi_a, phi_v], -1))  # [B, 28]
        # Segment scores whose argmax is the paper's rule (background iff p_t < 0.5, else the video's category):
        # the top category scores log p_t, the others less, background log(1 - p_t).
        shifted = category_logits - category_logits.max(-1, keepdim=True).values
        segment_logits = torch.cat([log_event[..., None] + shifted[:, None, :], log_background[..., None]], -1)
        return {
            "segment_logits": segment_logits,
            "category_logits": category_logits,
            "relevance": log_event.exp(),
            "log_relevance": log_event,
            "log_background": log_background,
        }

    def predict(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        category = outputs["category_logits"].argmax(-1, keepdim=True)  # [B, 1]
        event = outputs["log_relevance"] >= outputs["log_background"]  # p_t >= 0.5
        return torch.where(event, category, torch.full_like(category, BACKGROUND))

    def event_logits(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """logit(p_t) [B, T]: predict's event/background decision (background exactly when it is < 0)."""
        return outputs["log_relevance"] - outputs["log_background"]

    # ---- cross-modality localization (Sec. 3.3) ---------------------------------------------------------------------

    def forward_cml(
        self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor, query_mask: torch.Tensor, direction: str
    ) -> dict[str, torch.Tensor]:
        if self.task != "cml":
            raise RuntimeError("this DAM was built for supervised; call forward")
        if direction == "both":
            return {f"match_logits_{d}": self.forward_cml(visual, audio, mask, query_mask, d)["match_logits"]
                    for d in ("a2v", "v2a")}
        lengths_from_mask(mask)  # a non-prefix mask fails here (the supervised path's MaskedLSTM checks it too)
        query = query_mask & mask
        if bool((query.sum(1) == 0).any()):
            raise ValueError("every video needs at least one query second")
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        if direction == "a2v":
            # Query = audio: blank it outside the query so no later op can see it. The visual candidates' attention is
            # guided by the query's mean audio, the same vector for every second: a per-second a_t would hand over the
            # alignment (and audio outside the query).
            audio = zero_padded(audio, query)
            guide = masked_mean(audio, query)
            phi = self.audio_global(self.audio_local(audio), query)
            local = self.visual_local(self._guided_visual(visual, guide))
        elif direction == "v2a":
            # Query = visual: blanked outside the query. Its attention is guided by the mean candidate audio over all
            # real seconds (candidates are fully visible); again one vector for all seconds, so no alignment leaks in.
            visual = zero_padded(visual, query)
            guide = masked_mean(audio, mask)
            phi = self.visual_global(self.visual_local(self._guided_visual(visual, guide)), query)
            local = self.audio_local(audio)
        else:
            raise ValueError(f"direction must be 'a2v' or 'v2a', not {direction!r}")
        scores = _dot(phi, local).masked_fill(~mask, PAD_SCORE)
        return {"match_logits": scores}

    def _guided_visual(self, visual: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return self.attention(visual, guide[:, None, :].expand(-1, visual.shape[1], -1))[0]

    # ---- losses -----------------------------------------------------------------------------------------------------

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        mask = batch["mask"]
        if task == "cml" and "match_logits_a2v" in outputs:
            # --direction both, Eq. 7: p_t = (sigma(phi^A . f_t^V) + sigma(phi^V . f_t^A)) / 2, one BCE.
            x, y = outputs["match_logits_a2v"], outputs["match_logits_v2a"]
            log_p = torch.logaddexp(F.logsigmoid(x), F.logsigmoid(y)) - math.log(2.0)
            log_not_p = torch.logaddexp(F.logsigmoid(-x), F.logsigmoid(-y)) - math.log(2.0)
            target = batch["target_mask"].to(x.dtype)
            return per_video_mean(-(target * log_p + (1 - target) * log_not_p), mask)
        if task == "cml":
            # Per-direction BCE of sigma(phi_query . f_t^candidate) against the target span.
            return span_match_loss(outputs["match_logits"], batch["target_mask"], mask)
        event = batch["event"].to(outputs["log_relevance"].dtype)
        relevance = -(event * outputs["log_relevance"] + (1 - event) * outputs["log_background"])
        # Category CE only for videos that have an event (background-only videos have no category; relevance covers
        # them).
        category = event_category_loss(outputs["category_logits"], batch["video_label"])
        return self.lambda_category * category + (1 - self.lambda_category) * per_video_mean(relevance, mask)
