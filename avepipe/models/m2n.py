"""M2N: Multi-Modulation Network (Wang, Zha, Li, Chen, Luo), for supervised event localization and CML.

Notation of the paper -> code (``docs/models.md``, section M2N, has the full mapping and every choice where the paper is
silent):

* audio-guided visual attention (Tian et al.), then one linear layer per modality to ``d``: ``f_v``, ``f_a``.
* MHAttn (Eq. 2-4): ``MultiHeadAttention``. CMN (Eq. 1, 5-7) and IMN (Eq. 8) are both ``ModulatedNormalization``: the
  attention output gives ``gamma = tanh(Linear)``, ``beta = tanh(Linear)`` that scale and shift the feature normalised
  over its channels; CMN attends to the other modality, IMN to the same sequence.
* MSPM (Sec. 3.3, Eq. 9-11): ``MultiScaleProposalModulation``; MASM (Sec. 3.4, Eq. 12-13): ``MultiAlignmentModulation``.
* heads (Eq. 14-16), SEL loss (Eq. 17), CML with the averaged, repeated query and loss (Eq. 18): ``M2N``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avepipe.models.layers import (
    AudioGuidedVisualAttention,
    event_category_loss,
    lengths_from_mask,
    masked_max,
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
NORM_EPS = 1e-5  # inside sigma of Eq. 7-8 (LayerNorm's epsilon), so a constant feature does not divide by zero


def channel_normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - mu(x)) / sigma(x) with mu, sigma over the channel (last) dimension, as in Eq. 7-8 (no affine)."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + NORM_EPS)


class MultiHeadAttention(nn.Module):
    """Eq. 2-4: ``Concat(head_1..head_h) W^o``, ``head_i = softmax(Q W_i^q (K W_i^k)^T / sqrt(d_l)) V W_i^v``.

    The h matrices ``W_i^q`` (d x d_l each, d_l = d / h) are stored side by side in one bias-free d x d linear layer,
    likewise ``W^k``, ``W^v``; ``W^o`` is h*d_l x d, bias-free as written in Eq. 2. Keys outside ``key_mask`` are
    ignored.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"feature dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        return x.view(b, m, self.heads, d // self.heads).transpose(1, 2)  # [B, h, M, d_l]

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """query [B, Q, d], key / value [B, M, d], key_mask bool [B, M] (>= 1 True per row) -> [B, Q, d]."""
        q, k, v = self._split(self.query(query)), self._split(self.key(key)), self._split(self.value(value))
        # Eq. 4, scale 1 / sqrt(d_l) (SDPA's default for head width d_l).
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.out(heads.transpose(1, 2).flatten(2))


class ModulatedNormalization(nn.Module):
    """CMN (Eq. 1, 5-7) / IMN (Eq. 8): ``gamma * (x - mu(x)) / sigma(x) + beta``.

    ``m = MHAttn(x, guide, guide)``, ``gamma = tanh(Linear(m))``, ``beta = tanh(Linear(m))``. CMN: ``guide`` is the
    other modality; IMN: ``guide`` is the sequence ``x`` itself. Each output position depends only on its own ``x`` row
    and on all of ``guide``, so callers may pass a subset of the rows of ``x`` (MASM passes only the diagonal).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = MultiHeadAttention(dim, heads)
        self.scale = nn.Linear(dim, dim)  # Eq. 5
        self.shift = nn.Linear(dim, dim)  # Eq. 6

    def forward(self, x: torch.Tensor, guide: torch.Tensor, guide_mask: torch.Tensor) -> torch.Tensor:
        correlation = self.attention(x, guide, guide, guide_mask)  # Eq. 1
        return torch.tanh(self.scale(correlation)) * channel_normalize(x) + torch.tanh(self.shift(correlation))


def proposal_average_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """A [n, n, n] with ``A[i, j, k] = 1 / (j - i + 1)`` if ``i <= k <= j`` else 0.

    Then ``sum_k A[i, j, k] f[k] = 1/(j-i+1) * sum_{k=i}^{j} f[k]``, which is Eq. 9 for ``i <= j``; for ``i > j`` the
    range ``i <= k <= j`` is empty, so the entry is 0 (not a proposal, as in BMN's start-end map). One matrix product
    replaces the double loop over (i, j) and, unlike differences of cumulative sums, adds only the terms of Eq. 9.
    """
    idx = torch.arange(n, device=device)
    i, j, k = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    inside = (i <= k) & (k <= j)
    return inside.to(dtype) / (j - i + 1).clamp(min=1).to(dtype)


class MultiScaleProposalModulation(nn.Module):
    """MSPM (Sec. 3.3): IMN on the fused feature, proposal map (Eq. 9), Conv2d + residual, proposal relation
    (Eq. 10-11), then a multi-head self-attention."""

    def __init__(self, dim: int, heads: int, kernel: int):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (same-size output), got {kernel}")
        self.norm = ModulatedNormalization(dim, heads)  # IMN applied to f -> f_ms
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2)
        self.relation = nn.Linear(dim, dim, bias=False)  # W_ms of Eq. 10
        self.attention = MultiHeadAttention(dim, heads)

    @staticmethod
    def valid_proposals(mask: torch.Tensor) -> torch.Tensor:
        """bool [B, N, N]: (i, j) is a proposal of the video (i <= j, both real seconds)."""
        n = mask.shape[1]
        upper = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu()
        return upper[None] & mask[:, None, :]  # j real and i <= j imply i real (the mask is a prefix)

    def proposal_map(self, f_ms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 9: F_ms [B, N, N, d], zero where (i, j) is not a proposal of the video."""
        average = proposal_average_matrix(f_ms.shape[1], f_ms.device, f_ms.dtype)
        proposals = torch.einsum("ijk,bkd->bijd", average, zero_padded(f_ms, mask))
        return proposals * self.valid_proposals(mask)[..., None].to(f_ms.dtype)

    def relate(self, f_ms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 10-11: f'_ms = sum_j softmax_j(f_hat[i, :]) F'_ms[i, j] + f_ms[i], over the proposals starting at i."""
        proposals = self.proposal_map(f_ms, mask)
        # F'_ms = Conv2d(F_ms) + F_ms on the [N, N] start x end grid. The map is zero outside the video's proposals, so
        # a T-second video in a longer batch sees the same neighbourhood as alone (zeros = the conv's zero border).
        refined = self.conv(proposals.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + proposals
        projected = self.relation(f_ms)
        relation = projected @ projected.transpose(1, 2)  # Eq. 10, [B, N, N]
        valid = self.valid_proposals(mask)
        # Row i of a padded second has no proposal; its (unused) output just has to stay finite.
        relation = relation.masked_fill(~valid, torch.finfo(relation.dtype).min)
        weights = relation.softmax(-1)
        return torch.einsum("bij,bijd->bid", weights, refined) + f_ms  # Eq. 11

    def forward(self, fused: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f_ms = self.norm(fused, fused, mask)
        related = self.relate(f_ms, mask)
        return self.attention(related, related, related, mask)  # f_bar_ms


class MultiAlignmentModulation(nn.Module):
    """MASM (Sec. 3.4): the N x N map of visual x audio products (Eq. 12), IMN over its N*N positions, diagonal
    (Eq. 13)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = ModulatedNormalization(dim, heads)

    @staticmethod
    def alignment_map(f_v: torch.Tensor, f_a: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 12 reshaped to [B, N*N, d] (row i*N + j = f_v[i] * f_a[j]) and its mask (both seconds real)."""
        b, n, d = f_v.shape
        pairs = (f_v[:, :, None, :] * f_a[:, None, :, :]).reshape(b, n * n, d)
        return pairs, (mask[:, :, None] & mask[:, None, :]).reshape(b, n * n)

    def forward(self, f_v: torch.Tensor, f_a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pairs, pair_mask = self.alignment_map(f_v, f_a, mask)
        # IMN's output at position (i, j) depends on F_ma[i, j] and on all N*N positions (the attention's keys), so the
        # diagonal of F'_ma (Eq. 13) needs only the N diagonal rows as queries: Diag(IMN(F_ma)) = norm(diag, all pairs).
        return self.norm(f_v * f_a, pairs, pair_mask)



@register(
    "m2n",
    tasks=("supervised", "cml"),
    paper="Wang, Zha, Li, Chen, Luo. Multi-Modulation Network for Audio-Visual Event Localization",
    default_config={
        "model": {
            "visual_dim": 512,
            "audio_dim": 128,
            "att_hidden": 512,  # AVEL's audio-guided attention sizes (paper: "following [37]")
            "att_dim": 49,
            "dim": 256,  # Sec. 4.2: d = 256
            "heads": 4,  # Sec. 4.2: h = 4 in all multi-head attentions
            "conv_kernel": 3,  # MSPM Conv2d: the paper gives no size; 3 x 3 relates each proposal to its neighbours
        },
        # Sec. 4.2: Adam, lr 5e-4, batch 32. Epochs are not given: 150 epochs at batch 32 (105 steps on the 3,339-video
        # train split) is ~15,700 steps, the AVEL schedule's step budget; no decay is mentioned, so none.
        "train": {"optimizer": "adam", "lr": 5e-4, "batch_size": 32, "epochs": 150},
    },
    published={"supervised": 79.5, "cml-a2v": 51.2, "cml-v2a": 53.6, "selection": "unknown",
               "source": "M2N Tables 1-2 (no public code found)"},
)
class M2N(nn.Module):
    # CML: the max-contiguous sum adds the event-relevance predictions sigma(.) of Eq. 16 (Sec. 3.6), not logits.
    cml_decode = "sigmoid"

    def __init__(
        self,
        task: str,
        visual_dim: int = 512,
        audio_dim: int = 128,
        att_hidden: int = 512,
        att_dim: int = 49,
        dim: int = 256,
        heads: int = 4,
        conv_kernel: int = 3,
    ):
        super().__init__()
        if task not in ("supervised", "cml"):
            raise ValueError(f"M2N supports the supervised and cml tasks, not {task!r}")
        self.task = task
        self.attention = AudioGuidedVisualAttention(visual_dim, audio_dim, att_hidden, att_dim)
        self.project_visual = nn.Linear(visual_dim, dim)  # f_v
        self.project_audio = nn.Linear(audio_dim, dim)  # f_a
        self.cmn_visual, self.cmn_audio = ModulatedNormalization(dim, heads), ModulatedNormalization(dim, heads)
        self.imn_visual, self.imn_audio = ModulatedNormalization(dim, heads), ModulatedNormalization(dim, heads)
        self.mspm = MultiScaleProposalModulation(dim, heads, conv_kernel)
        self.masm = MultiAlignmentModulation(dim, heads)
        self.relevance = nn.Linear(dim, 1)  # Eq. 16
        if task == "supervised":
            self.classifier = nn.Linear(dim, NUM_CLASSES - 1)  # Eq. 15, C = 28 foreground categories

    # ---- shared encoder (Sec. 3.2-3.4) ------------------------------------------------------------------------------

    def encode(
        self, f_v: torch.Tensor, f_a: torch.Tensor, mask: torch.Tensor, skip_imn: str | None = None
    ) -> torch.Tensor:
        """CMN, IMN (omitted for the ``skip_imn`` modality, the CML query), MSPM + MASM -> f_av [B, N, d]."""
        f_v_c = self.cmn_visual(f_v, f_a, mask)  # Eq. 1-7
        f_a_c = self.cmn_audio(f_a, f_v, mask)
        f_v_i = f_v_c if skip_imn == "visual" else self.imn_visual(f_v_c, f_v_c, mask)  # Eq. 8
        f_a_i = f_a_c if skip_imn == "audio" else self.imn_audio(f_a_c, f_a_c, mask)
        return self.mspm(f_v_i * f_a_i, mask) + self.masm(f_v_i, f_a_i, mask)  # f_av = f_bar_ms + f_bar_ma

    # ---- supervised event localization (Sec. 3.5) -------------------------------------------------------------------

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.task != "supervised":
            raise RuntimeError("this M2N was built for cml; call forward_cml")
        lengths_from_mask(mask)  # a non-prefix mask fails here
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        f_v = self.project_visual(self.attention(visual, audio)[0])
        f_a = self.project_audio(audio)
        f_av = self.encode(f_v, f_a, mask)
        category_logits = self.classifier(masked_max(f_av, mask))  # Eq. 14-15 (softmax in the loss / argmax)
        relevance_logits = self.relevance(f_av).squeeze(-1)  # Eq. 16 before the sigmoid
        log_event, log_background = F.logsigmoid(relevance_logits), F.logsigmoid(-relevance_logits)
        # Segment scores whose argmax is the paper's rule (background iff p^r < 0.5, else argmax p^c): the top category
        # scores log p^r, the others less, background log(1 - p^r); ties (p^r = 0.5) go to the category, as ">= 0.5".
        shifted = category_logits - category_logits.max(-1, keepdim=True).values
        segment_logits = torch.cat([log_event[..., None] + shifted[:, None, :], log_background[..., None]], -1)
        return {
            "segment_logits": segment_logits,
            "category_logits": category_logits,
            "relevance_logits": relevance_logits,
            "relevance": torch.sigmoid(relevance_logits),  # p^r (Eq. 16): localize reports it as the event probability
        }

    def predict(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        category = outputs["category_logits"].argmax(-1, keepdim=True)  # [B, 1]
        event = outputs["relevance_logits"] >= 0  # p^r >= 0.5
        return torch.where(event, category, torch.full_like(category, BACKGROUND))

    def event_logits(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """logit(p^r) [B, T]: predict's event/background decision (background exactly when it is < 0)."""
        return outputs["relevance_logits"]

    # ---- cross-modality localization (Sec. 3.5) ---------------------------------------------------------------------

    def forward_cml(
        self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor, query_mask: torch.Tensor, direction: str
    ) -> dict[str, torch.Tensor]:
        if self.task != "cml":
            raise RuntimeError("this M2N was built for supervised; call forward")
        lengths_from_mask(mask)
        query = query_mask & mask
        if bool((query.sum(1) == 0).any()):
            raise ValueError("every video needs at least one query second")
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        n = mask.shape[1]
        if direction == "a2v":
            # Query = audio, blanked outside the query so no later op can see it. The visual candidates' attention is
            # guided by the query's mean audio, one vector for every second (a per-second a_t would give away the
            # alignment, and read audio outside the query).
            audio = zero_padded(audio, query)
            candidate = self.project_visual(self._guided_visual(visual, masked_mean(audio, query)))
            averaged = masked_mean(self.project_audio(audio), query)
            f_v, f_a, skip = candidate, averaged[:, None, :].expand(-1, n, -1), "audio"
        elif direction == "v2a":
            # Query = visual, blanked outside the query; its attention is guided by the mean candidate audio over all
            # real seconds (the candidate modality is fully visible), again one position-free vector.
            visual = zero_padded(visual, query)
            averaged = masked_mean(self.project_visual(self._guided_visual(visual, masked_mean(audio, mask))), query)
            f_v, f_a, skip = averaged[:, None, :].expand(-1, n, -1), self.project_audio(audio), "visual"
        else:
            raise ValueError(f"direction must be 'a2v' or 'v2a', not {direction!r}")
        # The averaged query repeated N times: every query row is the same, so its IMN is omitted (Sec. 3.5).
        f_av = self.encode(f_v, f_a, mask, skip_imn=skip)
        scores = self.relevance(f_av).squeeze(-1).masked_fill(~mask, PAD_SCORE)
        return {"match_logits": scores}

    def _guided_visual(self, visual: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return self.attention(visual, guide[:, None, :].expand(-1, visual.shape[1], -1))[0]

    # ---- losses -----------------------------------------------------------------------------------------------------

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        mask = batch["mask"]
        if task == "cml":
            # Eq. 18: (1/N) sum_t BCE(p_t^r, y_t) over each video's real seconds.
            return span_match_loss(outputs["match_logits"], batch["target_mask"], mask)
        logits = outputs["relevance_logits"]
        relevance = F.binary_cross_entropy_with_logits(logits, batch["event"].to(logits.dtype), reduction="none")
        # Eq. 17: L^c + (1/N) sum_t L_t^r. L^c only for videos with an event (background-only videos have no category).
        category = event_category_loss(outputs["category_logits"], batch["video_label"])
        return category + per_video_mean(relevance, mask)
