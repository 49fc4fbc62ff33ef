"""PSP: Positive Sample Propagation (Zhou, Zheng, Zhong, Hao, Wang, CVPR 2021), supervised and weak.

Sources: the paper (arXiv 2104.00239; its text was not readable here beyond the abstract and Fig. 2 caption) and the
released code, github jasongief/PSP_CVPR_2021 (``fully_model.py``, ``weakly_model.py``, ``measure.py``,
``fully_supervised_main.py``, ``weakly_supervised_main.py``), cross-checked with jasongief/CPSP
(``cpsp_avel/model/psp_family.py``, which names the matrices beta / gamma). ``docs/models.md`` (section PSP) maps every
block to its source and lists the choices.

* encoders: audio ``f_a(a) = W_2 W_1 a`` (two bias-free linears), AVEL's audio-guided visual attention guided by
  ``f_a(a)``, visual ``f_v`` (two bias-free linears), one BiLSTM per modality -> ``v_t``, ``a_t``.
* PSP (``PositiveSamplePropagation``): ``beta = relu(ReLU(W_v2 v) ReLU(W_a1 a)^T / sqrt(d))`` row-L1-normalised,
  ``gamma = 1[beta > tau] * beta`` row-L1-normalised again; ``v' = v + gamma^{va} ReLU(W_a2 a)``,
  ``a' = a + gamma^{av} ReLU(W_v1 v)`` with ``gamma^{av}`` from ``beta^T``; then ``LN(ReLU(W_fc x'))`` per modality and
  the fused feature ``(v'' + a'') / 2``.
* supervised: per-second classifier, CE + ``lambda`` * AVPS loss (MSE between the L1-normalised ``relu(cos(v''_t,
  a''_t))`` and ``1 / |event|`` on event seconds), ``avps_loss``.
* weak: weighting branch ``w_t = sigmoid(ReLU(W_3 s_t))`` on the per-second scores ``s_t``, MIL mean over the real
  seconds, softmax, BCE against the video-level label: by default the paper's (Sec. 3) and the released
  ``prob_label.h5``, the share of event and of background seconds (``weak_target="proportion"``, :func:`event_share`);
  ``"video-label"``: the one-hot video label.
* ``--preset released`` (what the released code computes; outputs equal to 1e-15, bench/released_parity.py):
  ``attention_form="released"`` (AVGA adds the audio projection along the position axis), ``init="xavier"``, and for
  the weak task ``weak_net="released"`` (weakly_model.py's own network: raw audio, ``linear_v``, no PSP output FC) with
  ``renormalize=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avepipe.models.layers import (
    AudioGuidedVisualAttention,
    MaskedLSTM,
    masked_cross_entropy,
    masked_mean,
    zero_padded,
)
from avepipe.models.registry import register

NUM_CLASSES = 29
BACKGROUND = 28
EPS = 1e-8  # added to every L1 normaliser (released code), so an all-zero row stays zero instead of NaN
# Released README / argparse defaults of the pruning threshold tau.
THRESHOLD = {"supervised": 0.099, "weak": 0.095}
WEAK_TARGETS = ("proportion", "video-label")
WEAK_NETS = ("supervised", "released")
AVPS_TARGETS = ("fresh", "released")


def l1_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row (last dim) divided by its sum (+ EPS)."""
    return x / (x.sum(-1, keepdim=True) + EPS)


class PositiveSamplePropagation(nn.Module):
    """The PSP module: all-pair audio-visual similarity, pruning with threshold ``tau``, propagation along the kept
    pairs, then per-modality FC + ReLU + LayerNorm (one LayerNorm shared by both modalities, as released)."""

    def __init__(self, dim: int, hidden: int, dropout: float, renormalize: bool = True, output_fc: bool = True):
        super().__init__()
        self.v_key = nn.Linear(dim, hidden, bias=False)  # v_L1 (visual messages to audio)
        self.v_query = nn.Linear(dim, hidden, bias=False)  # v_L2 (visual side of the similarity)
        self.a_query = nn.Linear(dim, hidden, bias=False)  # a_L1 (audio side of the similarity)
        self.a_value = nn.Linear(dim, hidden, bias=False)  # a_L2 (audio messages to visual)
        # output_fc=False: weakly_model.py's PSP, LayerNorm straight after the residual (no v_fc / a_fc)
        self.output_fc = output_fc
        if output_fc:
            self.v_fc = nn.Linear(hidden, dim, bias=False)
            self.a_fc = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.renormalize = renormalize
        if hidden != dim:
            raise ValueError(f"PSP adds the propagated messages to the input: psp_hidden ({hidden}) must equal {dim}")

    def similarity(self, v: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, tau: float):
        """-> (beta_va, gamma_va, gamma_av), each [B, T, T] (rows: receiving second, columns: sending second). Only real
        seconds send: padded columns are zero before any normalisation."""
        v2 = self.drop(F.relu(self.v_query(v)))
        a1 = self.drop(F.relu(self.a_query(a)))
        raw = F.relu(v2 @ a1.transpose(1, 2) / math.sqrt(v2.shape[-1]))  # [B, T_v, T_a]
        pair = mask[:, :, None] & mask[:, None, :]
        raw = raw * pair.to(raw.dtype)
        beta_va, beta_av = l1_rows(raw), l1_rows(raw.transpose(1, 2))
        gamma_va = (beta_va > tau).to(raw.dtype) * beta_va
        gamma_av = (beta_av > tau).to(raw.dtype) * beta_av
        if self.renormalize:
            gamma_va, gamma_av = l1_rows(gamma_va), l1_rows(gamma_av)
        return beta_va, gamma_va, gamma_av

    def forward(self, v: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, tau: float):
        """v, a [B, T, D] -> (fused, v'', a'') each [B, T, D]."""
        _, gamma_va, gamma_av = self.similarity(v, a, mask, tau)
        v1 = self.drop(F.relu(self.v_key(v)))
        a2 = self.drop(F.relu(self.a_value(a)))
        v_psp = v + gamma_va @ a2
        a_psp = a + gamma_av @ v1
        if not self.output_fc:
            v_out, a_out = self.norm(v_psp), self.norm(a_psp)
            return 0.5 * (v_out + a_out), v_out, a_out
        v_out = self.norm(self.drop(F.relu(self.v_fc(v_psp))))
        a_out = self.norm(self.drop(F.relu(self.a_fc(a_psp))))
        return 0.5 * (v_out + a_out), v_out, a_out


def event_share(event: torch.Tensor, video_label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The weak setting's video-level label [B, 29] (the paper's Sec. 3; the released ``prob_label.h5``, "the proportion
    of the background and event segments", author's reply in jasongief/PSP_CVPR_2021 issue #7): ``|event| / T`` on the
    video's category, ``1 - |event| / T`` on background, T the real seconds. Only the event's length enters, not where
    it lies; a background-only video (category 28, no event) gets 1 on background."""
    share = torch.where(mask, event, torch.zeros_like(event)).sum(1) / mask.sum(1).clamp(min=1).to(event.dtype)
    category = F.one_hot(video_label, NUM_CLASSES).to(share.dtype)
    background = F.one_hot(torch.full_like(video_label, BACKGROUND), NUM_CLASSES).to(share.dtype)
    return share[:, None] * category + (1 - share[:, None]) * background


def avps_loss(cosine: torch.Tensor, event: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Audio-visual pair similarity loss (released ``measure.AVPSLoss``, the paper's Eq. 8-9 per its comment).

    ``s_t = relu(c_t) / sum_t relu(c_t)`` over the real seconds, target ``y_t = 1/|event|`` on event seconds, 0 else;
    squared error averaged over each video's real seconds, then over the videos that have an event (a video without an
    event has no positive pair to pull together; the released loader never sees one in the supervised split)."""
    sim = F.relu(cosine) * mask.to(cosine.dtype)
    s = sim / (sim.sum(1, keepdim=True) + EPS)
    event = event.to(cosine.dtype) * mask.to(cosine.dtype)
    count = event.sum(1, keepdim=True)
    target = event / count.clamp(min=1)
    per_video = masked_mean((s - target) ** 2, mask)
    has_event = (count[:, 0] > 0).to(cosine.dtype)
    return (per_video * has_event).sum() / has_event.sum().clamp(min=1)


@register(
    "psp",
    tasks=("supervised", "weak"),
    paper="Zhou, Zheng, Zhong, Hao, Wang. Positive Sample Propagation along the Audio-Visual Event Line. CVPR 2021",
    default_config={
        "model": {
            "visual_dim": 512,
            "audio_dim": 128,
            "embed_hidden": 256,  # f_a / f_v: Linear(D, 256) -> Linear(256, 128), bias-free (fully_model.py)
            "embed_dim": 128,
            "att_hidden": 512,  # AVGA sizes (AVEL's)
            "att_dim": 49,
            "lstm_hidden": 128,  # BiLSTMs, 2 x 128 = 256-d PSP input
            "classifier_hidden": 64,  # L1: 256 -> 64 (bias-free), ReLU, L2: 64 -> 29 (bias-free)
            "threshold": None,  # tau; None: the released 0.099 (supervised) / 0.095 (weak)
            "renormalize": True,  # L1-normalise gamma again after pruning (fully_model.py; weakly_model.py does not)
            "dropout": 0.1,
            "lambda_avps": 100.0,  # released --LAMBDA
            "weak_target": "proportion",  # prob_label.h5: event / background share (Sec. 3); "video-label": one-hot
            "attention_form": "paper",  # "released": the audio projection added along the position axis (AVGA)
            "init": "pytorch",  # "xavier": Xavier-uniform attention, PSP and classifier weights (released)
            "weak_net": "supervised",  # weak task: "released" is weakly_model.py's own network (see PSP.__init__)
            "avps_target": "fresh",  # "released": the released loader's AVPS target buffer, never cleared (see loss)
        },
        # Released fully_supervised_main.py: Adam 1e-3, batch 128, 300 epochs, lr x 0.8 after epochs 60 and 120
        # ((epoch+1) % 60 == 0 and epoch < 170). The weak script decays after 80 and 160 instead.
        "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": 128, "epochs": 300, "lr_milestones": [60, 120],
                  "lr_gamma": 0.8},
    },
    # fully_model.py / weakly_model.py as they compute (docs/models.md, "Presets", PSP rows with files and lines).
    presets={"released": {
        "model": {"attention_form": "released", "init": "xavier", "avps_target": "released"},
        # dataloader.py get_batch: random.shuffle each epoch, and the len // batch_size loop drops the leftover rows
        "train": {"batch_order": "shuffled-full"},
        "tasks": {"weak": {"model": {"renormalize": False, "weak_net": "released"},
                           "train": {"lr_milestones": [80, 160]}}},
    }},
    published={"supervised": 77.8, "weak": 73.5, "selection": "test",
               "source": "PSP CVPR21, as its README quotes (the released scripts keep the best test epoch)"},
)
class PSP(nn.Module):
    def __init__(
        self,
        task: str,
        visual_dim: int = 512,
        audio_dim: int = 128,
        embed_hidden: int = 256,
        embed_dim: int = 128,
        att_hidden: int = 512,
        att_dim: int = 49,
        lstm_hidden: int = 128,
        classifier_hidden: int = 64,
        threshold: float | None = None,
        renormalize: bool = True,
        dropout: float = 0.1,
        lambda_avps: float = 100.0,
        weak_target: str = "proportion",
        attention_form: str = "paper",
        init: str = "pytorch",
        weak_net: str = "supervised",
        avps_target: str = "fresh",
    ):
        super().__init__()
        if task not in ("supervised", "weak"):
            raise ValueError(f"PSP supports the supervised and weak tasks, not {task!r}")
        if weak_target not in WEAK_TARGETS:
            raise ValueError(f"unknown weak_target {weak_target!r} (expected one of {WEAK_TARGETS})")
        if init not in ("pytorch", "xavier") or weak_net not in WEAK_NETS:
            raise ValueError(f"unknown init {init!r} / weak_net {weak_net!r} (init: pytorch, xavier; weak_net: "
                             f"{', '.join(WEAK_NETS)})")
        if avps_target not in AVPS_TARGETS:
            raise ValueError(f"unknown avps_target {avps_target!r} (expected one of {AVPS_TARGETS})")
        self.task, self.lambda_avps, self.weak_target = task, lambda_avps, weak_target
        self.avps_target = avps_target
        self._avps_buffer: torch.Tensor | None = None  # avps_target="released": the loader's target buffer
        self.threshold = THRESHOLD[task] if threshold is None else float(threshold)
        # weak_net="released" (weak task): weakly_model.py's psp_net, which has no f_a / f_v: the attention is guided
        # by the raw audio, one Linear(Dv, Da) with bias (linear_v) maps the attended visual vector to the audio width,
        # the audio BiLSTM reads the raw audio, and PSP has no output FC (LayerNorm straight after the residual).
        self.released_weak = task == "weak" and weak_net == "released"
        if self.released_weak:
            self.embed_audio = nn.Identity()
            self.embed_visual = nn.Linear(visual_dim, audio_dim)  # linear_v
            embed_dim = audio_dim
        else:
            self.embed_audio = nn.Sequential(nn.Linear(audio_dim, embed_hidden, bias=False),
                                             nn.Linear(embed_hidden, embed_dim, bias=False))
            self.embed_visual = nn.Sequential(nn.Linear(visual_dim, embed_hidden, bias=False),
                                              nn.Linear(embed_hidden, embed_dim, bias=False))
        self.attention = AudioGuidedVisualAttention(visual_dim, embed_dim, att_hidden, att_dim, attention_form)
        self.audio_lstm = MaskedLSTM(embed_dim, lstm_hidden)
        self.visual_lstm = MaskedLSTM(embed_dim, lstm_hidden)
        dim = 2 * lstm_hidden
        self.psp = PositiveSamplePropagation(dim, dim, dropout, renormalize, output_fc=not self.released_weak)
        self.classifier = nn.Sequential(nn.Linear(dim, classifier_hidden, bias=False), nn.ReLU(),
                                        nn.Linear(classifier_hidden, NUM_CLASSES, bias=False))
        if task == "weak":
            self.weighting = nn.Linear(NUM_CLASSES, 1, bias=False)  # W3 of the weighting branch
        if init == "xavier":
            for layer in self.xavier_layers():
                nn.init.xavier_uniform_(layer.weight)

    def xavier_layers(self) -> list[nn.Linear]:
        """The layers the released code gives Xavier-uniform weights (biases keep PyTorch's init): the attention's five
        (AVGA.__init__), PSP's four similarity / message layers and its two output FCs where present
        (PSP.init_weights), the classifier's L1 and L2 (psp_net.init_layers). Not f_a, f_v, linear_v, W3, the LSTMs."""
        psp = [self.psp.v_key, self.psp.v_query, self.psp.a_query, self.psp.a_value]
        if self.psp.output_fc:
            psp += [self.psp.v_fc, self.psp.a_fc]
        att = self.attention
        return [att.embed_visual, att.embed_audio, att.project_visual, att.project_audio, att.score, *psp,
                self.classifier[0], self.classifier[2]]

    def encode(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor):
        """-> (v_t, a_t) [B, T, 2h], the BiLSTM features that enter PSP."""
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        audio_embedded = self.embed_audio(audio)
        attended, _ = self.attention(visual, audio_embedded)
        v, _ = self.visual_lstm(self.embed_visual(attended), mask)
        a, _ = self.audio_lstm(audio_embedded, mask)
        return v, a

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        v, a = self.encode(visual, audio, mask)
        fused, v_out, a_out = self.psp(v, a, mask, self.threshold)
        scores = self.classifier(fused)  # [B, T, 29]
        if self.task == "supervised":
            return {"segment_logits": scores, "avps": F.cosine_similarity(v_out, a_out, dim=-1, eps=1e-12)}
        weights = torch.sigmoid(F.relu(self.weighting(scores)))  # [B, T, 1], the weighting branch
        weighted = scores * weights
        return {"segment_logits": weighted, "video_logits": masked_mean(weighted, mask),
                "segment_weights": weights.squeeze(-1)}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        mask = batch["mask"]
        if task == "supervised":
            ce = masked_cross_entropy(outputs["segment_logits"], batch["labels"], mask)
            if self.avps_target == "released":
                target = self.released_avps_target(batch["event"], mask)
                return ce + self.lambda_avps * released_avps_loss(outputs["avps"], target, mask)
            return ce + self.lambda_avps * avps_loss(outputs["avps"], batch["event"], mask)
        if task == "weak":
            # weakly_supervised_main.py: nn.BCELoss()(softmax(mean_t w_t s_t), prob_labels)
            probs = outputs["video_logits"].softmax(-1)
            if self.weak_target == "proportion":
                target = event_share(batch["event"], batch["video_label"], mask).to(probs.dtype)
            else:
                target = F.one_hot(batch["video_label"], NUM_CLASSES).to(probs.dtype)
            return F.binary_cross_entropy(probs, target)
        raise ValueError(f"PSP has no loss for task {task!r}")

    def released_avps_target(self, event: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The AVPS target of the released loader (dataloader.py ``AVE_Fully_Dataset.get_segment_wise_relation``):
        row i of a batch sets ``1 / n`` on the n seconds of its first labelled class (the event's seconds; a video
        without an event: all its seconds, from the background column) in a ``[batch_size, 10]`` buffer that is never
        cleared, so its other seconds keep whatever row i of an earlier batch left there (zeros at the start). The
        buffer lives on the model across batches and epochs (not in the checkpoint: a resumed run starts it at 0)."""
        b, t = event.shape
        old = self._avps_buffer
        if old is None or old.shape[1] != t or old.shape[0] < b or old.device != event.device:
            grown = torch.zeros(max(b, 0 if old is None else old.shape[0]), t, dtype=torch.float32, device=event.device)
            if old is not None and old.shape[1] == t:
                grown[: old.shape[0]] = old.to(event.device)
            old = grown
        chosen = event.bool() & mask
        chosen = torch.where(chosen.any(1, keepdim=True), chosen, mask)
        count = chosen.sum(1, keepdim=True).clamp(min=1).to(old.dtype)
        target = torch.where(chosen, 1.0 / count, old[:b])
        old[:b] = target
        self._avps_buffer = old
        return target.clone()

    def predict(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return outputs["segment_logits"].argmax(-1)


def released_avps_loss(cosine: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """measure.py ``AVPSLoss``: ``relu(c_t) / (sum_t relu(c_t) + 1e-8)`` against ``target`` [B, T], squared error
    averaged over every real second of every video (``nn.MSELoss`` over the batch)."""
    sim = F.relu(cosine) * mask.to(cosine.dtype)
    s = sim / (sim.sum(1, keepdim=True) + EPS)
    return ((s - target.to(s.dtype)) ** 2)[mask].mean()
