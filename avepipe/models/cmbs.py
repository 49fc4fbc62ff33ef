"""CMBS: Cross-Modal Background Suppression (Xia & Zhao, CVPR 2022), supervised and weak.

Sources: the paper's abstract (its full text was not readable here) and the released code, github marmot-xy/CMBS
(``model/main_model.py``, ``model/models.py``, ``configs/main.json``, ``configs/weak.json``, ``supv_main.py``,
``weakly_main.py``, ``supv_train.sh``, ``weakly_train.sh``). ``docs/models.md`` (section CMBS) maps every block to its
source and lists the choices.

* cross-modal gated attention (``GatedSpatialAttention``, released ``New_Audio_Guided_Attention``): visual
  self-attention over the 49 cells, a visual-global spatial attention, audio-guided channel
  attention ``v * (1 + sigmoid(.))``, an audio-guided spatial attention, combined as ``c + beta * sigmoid(s) * c``.
* temporal encoders / cross-modal decoders (``EncoderStack``, ``CrossDecoder``, borrowed from CMRAN): each modality's
  query attends to the other modality's encoded sequence and to itself.
* time-level background suppression: ``g^a = sigmoid(w_a . E_a)``, ``g^v = sigmoid(w_v . E_v)``; the visual stream
  is scaled by the audio gate and vice versa: ``x + alpha * g * x`` (supervised), ``(1 - alpha) x + alpha * g * x``
  (weak; ``weak_gates="own"``, the released weak wiring: each stream by its own encoder's gate).
* event-level background suppression: class activation sequences per modality (top-k mean over time); supervised adds
  ``gamma`` * their mean to the category logits, weak scales the fused CAS by ``gamma * (sigmoid(cas_v) +
  sigmoid(cas_a))``.
* audio-visual interaction (``AudioVisualInteraction``): ``LN(v*a + MHA(v*a, [a; v], [a; v]))``, visual first, then
  audio with the updated visual.
* weak decision (``weak_rule``): the released rule gives every second the video-level class (the top-k mean of the CAS,
  29 classes) when its event test passes; that test (``sigmoid(av_gate) > 0.5`` on a gate that is already a sigmoid)
  always passes. ``"video-class"`` (default) keeps the video-level class and tests each second with the CAS instead:
  the second is the event when the video's class is its best CAS class, else background (one event class per video,
  as AVE is annotated). ``"released"``: the released test as written; ``"segment-argmax"``: the per-second CAS argmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avepipe.models.layers import (
    MaskedLSTM,
    event_category_loss,
    lengths_from_mask,
    masked_max,
    per_video_mean,
    softmax_margin_loss,
    zero_padded,
)
from avepipe.models.registry import register

NUM_CLASSES = 29
BACKGROUND = 28
WEAK_RULES = ("video-class", "segment-argmax", "released")
WEAK_LOSSES = ("ce", "released")
# Released configs/main.json (supervised) and configs/weak.json (weak); the other per-task values are read off
# main_model.py (supv_main_model / weak_main_model).
TASK_DEFAULTS = {
    "supervised": {"alpha": 0.1, "gamma": 0.3, "beta": 0.4, "temporal_lstm": True, "encoder_ff": 1024,
                   "interaction_heads": 4, "visual_dropout": 0.2},
    "weak": {"alpha": 0.2, "gamma": 0.5, "beta": 0.5, "temporal_lstm": False, "encoder_ff": 2048,
             "interaction_heads": 2, "visual_dropout": 0.1},
}


def top_k_mean(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest per-second scores [B, T, C] over the real seconds (k capped at each video's length)."""
    k_b = mask.sum(1).clamp(max=k)  # [B]
    ranked = scores.masked_fill(~mask[..., None], float("-inf")).sort(dim=1, descending=True).values
    keep = torch.arange(scores.shape[1], device=scores.device)[None, :] < k_b[:, None]
    total = torch.where(keep[..., None], ranked, torch.zeros((), dtype=scores.dtype, device=scores.device)).sum(1)
    return total / k_b[:, None].to(scores.dtype)


class GatedSpatialAttention(nn.Module):
    """Cross-modal gated attention (released ``New_Audio_Guided_Attention``), per second on the [49, Dv] map.

    1. self-attention over cells: ``s = LN(v + softmax(W_q v (W_k v)^T) W_v v)`` (no 1/sqrt(d) scaling, as released);
    2. visual-global spatial attention: ``z_i = tanh(w_g . (ReLU(W_3 s_i) * ReLU(W_m mean_i s)))``, softmax over i,
       ``o = sum_i softmax(z)_i s_i``;
    3. channel attention guided by audio: ``q = mean_i(ReLU(W_a1 a) * ReLU(W_v1 s_i))``,
       ``m = sigmoid(W_c ReLU(W_b q))``, ``c_i = v_i * (1 + m)`` (on the cells before self-attention);
    4. spatial attention guided by audio: ``z'_i = tanh(w_s . (ReLU(W_v2 c_i) * ReLU(W_a2 a)))``,
       ``x = sum_i softmax(z')_i c_i``;
    output ``x + beta * sigmoid(o) * x``  [B, T, Dv].
    """

    def __init__(self, visual_dim: int, audio_dim: int, hidden: int, latent: int, beta: float, dropout: float):
        super().__init__()
        self.beta = beta
        self.query = nn.Linear(visual_dim, visual_dim // latent)
        self.key = nn.Linear(visual_dim, visual_dim // latent)
        self.value = nn.Linear(visual_dim, visual_dim)
        self.norm = nn.LayerNorm(visual_dim)
        self.drop = nn.Dropout(dropout)
        self.global_embed = nn.Linear(visual_dim, hidden)  # affine_video_ave
        self.cell_embed = nn.Linear(visual_dim, hidden)  # affine_video_3
        self.global_score = nn.Linear(hidden, 1)  # ave_v_att
        self.channel_audio = nn.Linear(audio_dim, visual_dim)  # affine_audio_1
        self.channel_visual = nn.Linear(visual_dim, visual_dim)  # affine_video_1
        self.channel_bottleneck = nn.Linear(visual_dim, hidden)  # affine_bottleneck
        self.channel_out = nn.Linear(hidden, visual_dim)  # affine_v_c_att
        self.spatial_visual = nn.Linear(visual_dim, hidden)  # affine_video_2
        self.spatial_audio = nn.Linear(audio_dim, hidden)  # affine_audio_2
        self.spatial_score = nn.Linear(hidden, 1)  # affine_v_s_att

    def self_attention(self, v: torch.Tensor) -> torch.Tensor:
        energy = self.query(v) @ self.key(v).transpose(-1, -2)  # [..., N, N]
        return self.norm(v + self.drop(energy.softmax(-1) @ self.value(v)))

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """visual [B, T, S, S, Dv] or [B, T, N, Dv], audio [B, T, Da] -> [B, T, Dv]."""
        if visual.dim() == 5:
            visual = visual.flatten(2, 3)
        s = self.self_attention(visual)  # [B, T, N, Dv]
        g = F.relu(self.global_embed(s.mean(2)))  # [B, T, H]
        z = torch.tanh(self.global_score(F.relu(self.cell_embed(s)) * g[:, :, None, :])).squeeze(-1)
        global_att = (z.softmax(-1)[..., None] * s).sum(2)  # [B, T, Dv]
        q = (F.relu(self.channel_audio(audio))[:, :, None, :] * F.relu(self.channel_visual(s))).mean(2)
        channel = torch.sigmoid(self.channel_out(F.relu(self.channel_bottleneck(q))))  # [B, T, Dv]
        c = visual * (channel[:, :, None, :] + 1)
        guide = F.relu(self.spatial_audio(audio))[:, :, None, :]
        z2 = torch.tanh(self.spatial_score(F.relu(self.spatial_visual(c)) * guide))
        x = (z2.squeeze(-1).softmax(-1)[..., None] * c).sum(2)
        return x + self.beta * torch.sigmoid(global_att) * x


class EncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer (CMRAN's): ``x = LN(x + MHA(x, x, x))``, ``x = LN(x + FFN(x))``."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop1(self.attn(x, x, x, key_padding_mask=~mask, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ff(x)))


class EncoderStack(nn.Module):
    """Internal temporal relation module: Linear(input, d) then ``layers`` encoder layers."""

    def __init__(self, input_dim: int, dim: int, heads: int, ff_dim: int, layers: int, dropout: float):
        super().__init__()
        self.project = nn.Linear(input_dim, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ff_dim, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CrossDecoder(nn.Module):
    """Cross-modal relation attention: ``q = Linear(x)``; keys/values = [memory; q] (the other modality's encoded
    sequence and the query itself, as the released DecoderLayer concatenates them); ``q = LN(q + MHA)``,
    ``q = LN(q + FFN(q))``. (The released DecoderLayer also builds a self-attention it never calls; it is left out.)"""

    def __init__(self, input_dim: int, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.project = nn.Linear(input_dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.project(x)
        keys = torch.cat([memory, q], 1)
        key_mask = torch.cat([mask, mask], 1)
        q = self.norm1(q + self.drop1(self.attn(q, keys, keys, key_padding_mask=~key_mask, need_weights=False)[0]))
        return self.norm2(q + self.drop2(self.ff(q)))


class AudioVisualInteraction(nn.Module):
    """``u = x * y``; ``LN(u + MHA(u, [y; x], [y; x]))`` (released AudioVideoInter, x = the stream being updated)."""

    def __init__(self, dim: int, heads: int, head_dropout: float, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=head_dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        u = x * y
        memory = torch.cat([y, x], 1)
        out = self.attn(u, memory, memory, key_padding_mask=~torch.cat([mask, mask], 1), need_weights=False)[0]
        return self.norm(u + self.drop(out))


@register(
    "cmbs",
    tasks=("supervised", "weak"),
    paper="Xia, Zhao. Cross-Modal Background Suppression for Audio-Visual Event Localization. CVPR 2022",
    default_config={
        "model": {
            "visual_dim": 512,
            "audio_dim": 128,
            "d_model": 256,
            "att_hidden": 256,  # gated attention's hidden width (released hidden_dim = 256)
            "att_latent": 4,  # query/key width = Dv / 4 (released latent_dim)
            "encoder_heads": 4,
            "encoder_layers": 2,
            "decoder_ff": 1024,
            "dropout": 0.1,  # encoder / decoder layers (CMRAN default)
            "top_k": 4,  # class activation sequence: mean of the 4 best seconds
            # None: the released per-task value (TASK_DEFAULTS): alpha, gamma, beta from configs/main.json / weak.json
            "alpha": None,
            "gamma": None,
            "beta": None,
            "temporal_lstm": None,  # supervised: BiLSTMs before the encoders; weak: none (released)
            "encoder_ff": None,  # 1024 supervised / 2048 weak
            "interaction_heads": None,  # 4 supervised / 2 weak
            "visual_dropout": None,  # after the visual FC: 0.2 supervised / 0.1 weak
            "gate_loss": "bce",  # "bce" on the gate probability; "released": BCE-with-logits applied to it
            "weak_rule": "video-class",  # the video's class where it is a second's best CAS class; see WEAK_RULES
            "weak_loss": "ce",  # softmax CE of the video scores; "released": multi-label soft margin on the softmax
            "weak_gates": "cross",  # weak: each stream scaled by the other modality's gate; "own": its own (released)
            "attention_dropout": None,  # gated attention's self-attention dropout; None: visual_dropout (released: 0.2)
        },
        # Released supv_train.sh / supv_main.py: Adam 7e-4, batch 64, 200 epochs, lr x 0.5 after epochs 10, 20, 30,
        # gradient norm clipped at 0.5. The weak scripts use lr 6e-4 and milestones 10, 20, 40.
        "train": {"optimizer": "adam", "lr": 7e-4, "batch_size": 64, "epochs": 200, "lr_milestones": [10, 20, 30],
                  "lr_gamma": 0.5, "grad_clip": 0.5},
    },
    presets={"released": {
        "model": {"gate_loss": "released", "weak_rule": "released", "weak_loss": "released", "weak_gates": "own",
                  "attention_dropout": 0.2},  # models.py New_Audio_Guided_Attention: nn.Dropout(0.2)
        "tasks": {"weak": {"train": {"lr": 6e-4, "lr_milestones": [10, 20, 40]}}},  # weakly_train.sh, weakly_main.py
    }},
    published={"supervised": 79.3, "weak": 74.2, "selection": "test",
               "source": "CMBS CVPR22 (released supv_main.py / weakly_main.py keep the best test epoch)"},
)
class CMBS(nn.Module):
    def __init__(
        self,
        task: str,
        visual_dim: int = 512,
        audio_dim: int = 128,
        d_model: int = 256,
        att_hidden: int = 256,
        att_latent: int = 4,
        encoder_heads: int = 4,
        encoder_layers: int = 2,
        decoder_ff: int = 1024,
        dropout: float = 0.1,
        top_k: int = 4,
        alpha: float | None = None,
        gamma: float | None = None,
        beta: float | None = None,
        temporal_lstm: bool | None = None,
        encoder_ff: int | None = None,
        interaction_heads: int | None = None,
        visual_dropout: float | None = None,
        gate_loss: str = "bce",
        weak_rule: str = "video-class",
        weak_loss: str = "ce",
        weak_gates: str = "cross",
        attention_dropout: float | None = None,
    ):
        super().__init__()
        if task not in ("supervised", "weak"):
            raise ValueError(f"CMBS supports the supervised and weak tasks, not {task!r}")
        if gate_loss not in ("bce", "released"):
            raise ValueError(f"unknown gate_loss {gate_loss!r} (expected 'bce' or 'released')")
        if weak_rule not in WEAK_RULES or weak_loss not in WEAK_LOSSES:
            raise ValueError(f"unknown weak_rule {weak_rule!r} / weak_loss {weak_loss!r} (weak_rule: "
                             f"{', '.join(WEAK_RULES)}; weak_loss: {', '.join(WEAK_LOSSES)})")
        given = {"alpha": alpha, "gamma": gamma, "beta": beta, "temporal_lstm": temporal_lstm,
                 "encoder_ff": encoder_ff, "interaction_heads": interaction_heads, "visual_dropout": visual_dropout}
        cfg = {k: (TASK_DEFAULTS[task][k] if v is None else v) for k, v in given.items()}
        if weak_gates not in ("cross", "own"):
            raise ValueError(f"unknown weak_gates {weak_gates!r} (expected 'cross' or 'own')")
        self.task, self.top_k, self.gate_loss = task, top_k, gate_loss
        self.own_gates = task == "weak" and weak_gates == "own"
        self.weak_rule, self.weak_loss = weak_rule, weak_loss
        self.alpha, self.gamma = float(cfg["alpha"]), float(cfg["gamma"])
        self.visual_fc = nn.Linear(visual_dim, visual_dim)
        self.visual_drop = nn.Dropout(cfg["visual_dropout"])
        att_dropout = cfg["visual_dropout"] if attention_dropout is None else attention_dropout
        self.attention = GatedSpatialAttention(visual_dim, audio_dim, att_hidden, att_latent, float(cfg["beta"]),
                                               att_dropout)
        if cfg["temporal_lstm"]:
            # Released RNNEncoder: audio BiLSTM with d/2 per direction (-> d), visual with d per direction (-> 2d).
            self.audio_lstm = MaskedLSTM(audio_dim, d_model // 2)
            self.visual_lstm = MaskedLSTM(visual_dim, d_model)
            audio_in, visual_in = d_model, 2 * d_model
        else:
            self.audio_lstm = self.visual_lstm = None
            audio_in, visual_in = audio_dim, visual_dim
        ff = int(cfg["encoder_ff"])
        self.visual_encoder = EncoderStack(visual_in, d_model, encoder_heads, ff, encoder_layers, dropout)
        self.audio_encoder = EncoderStack(audio_in, d_model, encoder_heads, ff, encoder_layers, dropout)
        self.audio_decoder = CrossDecoder(audio_in, d_model, encoder_heads, decoder_ff, dropout)
        self.visual_decoder = CrossDecoder(visual_in, d_model, encoder_heads, decoder_ff, dropout)
        self.audio_gate = nn.Linear(d_model, 1)
        self.visual_gate = nn.Linear(d_model, 1)
        n_cas = NUM_CLASSES - 1 if task == "supervised" else NUM_CLASSES
        self.audio_cas = nn.Linear(d_model, n_cas)
        self.visual_cas = nn.Linear(d_model, n_cas)
        heads = int(cfg["interaction_heads"])
        self.av_interaction = AudioVisualInteraction(d_model, heads, head_dropout=0.2)
        self.va_interaction = AudioVisualInteraction(d_model, heads, head_dropout=0.2)
        if task == "supervised":
            self.event_head = nn.Linear(d_model, 1)  # is-event score per second
            self.category_head = nn.Linear(d_model, NUM_CLASSES - 1)  # on the max over time
        else:
            self.cas_head = nn.Linear(d_model, NUM_CLASSES, bias=False)  # released Conv1d(k=1, bias=False)

    def trunk(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything up to the audio-visual interaction; returns the intermediate streams for the heads (and tests)."""
        lengths_from_mask(mask)
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        visual = self.visual_drop(F.relu(self.visual_fc(visual)))
        v = self.attention(visual, audio)  # [B, T, Dv]
        a = audio
        if self.audio_lstm is not None:
            a, _ = self.audio_lstm(audio, mask)
            v, _ = self.visual_lstm(v, mask)
        e_v, e_a = self.visual_encoder(v, mask), self.audio_encoder(a, mask)
        q_a = self.audio_decoder(a, e_v, mask)  # audio queries the encoded visual sequence
        q_v = self.visual_decoder(v, e_a, mask)
        g_a = torch.sigmoid(self.audio_gate(e_a))  # [B, T, 1], the audio's view of which seconds matter
        g_v = torch.sigmoid(self.visual_gate(e_v))
        # Time-level background suppression: each stream is scaled by the *other* modality's gate; with
        # weak_gates="own" (released weak_main_model: ``audio_gate = self.audio_gated(video_key_value_feature)`` scales
        # ``video_query_output``) each stream by the gate of its own encoder.
        gate_for_visual, gate_for_audio = (g_v, g_a) if self.own_gates else (g_a, g_v)
        if self.task == "supervised":
            q_v, q_a = q_v + self.alpha * g_a * q_v, q_a + self.alpha * g_v * q_a
        else:
            q_v = (1 - self.alpha) * q_v + self.alpha * gate_for_visual * q_v
            q_a = (1 - self.alpha) * q_a + self.alpha * gate_for_audio * q_a
        cas_v, cas_a = self.visual_cas(q_v), self.audio_cas(q_a)
        o_v = self.av_interaction(q_v, q_a, mask)
        o_a = self.va_interaction(q_a, o_v, mask)
        return {"gate_audio": g_a.squeeze(-1), "gate_visual": g_v.squeeze(-1), "cas_visual": cas_v,
                "cas_audio": cas_a, "fused": 0.5 * (o_v + o_a)}

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.trunk(visual, audio, mask)
        fused = t["fused"]
        if self.task == "supervised":
            # Event-level background suppression: the modalities' CAS scores (top-k mean) added to the category logits.
            av_score = 0.5 * (top_k_mean(t["cas_visual"], mask, self.top_k) + top_k_mean(t["cas_audio"], mask,
                                                                                             self.top_k))
            category_logits = self.category_head(masked_max(fused, mask)) + self.gamma * av_score
            event_logits = self.event_head(fused).squeeze(-1)  # [B, T]
            log_event, log_background = F.logsigmoid(event_logits), F.logsigmoid(-event_logits)
            shifted = category_logits - category_logits.max(-1, keepdim=True).values
            segment_logits = torch.cat([log_event[..., None] + shifted[:, None, :], log_background[..., None]], -1)
            return {"segment_logits": segment_logits, "event_logits": event_logits, "category_logits": category_logits,
                    "av_score": av_score, "av_gate": t["gate_audio"] * t["gate_visual"]}
        # Weak: the fused CAS scaled by both modalities' CAS gates; video score = av_gate * top-k mean, max over time.
        cas = self.cas_head(fused)
        cas = self.gamma * torch.sigmoid(t["cas_visual"]) * cas + self.gamma * torch.sigmoid(t["cas_audio"]) * cas
        raw = top_k_mean(cas, mask, self.top_k)  # [B, 29], the released raw_logits
        av_gate = 0.5 * (t["gate_audio"] + t["gate_visual"])  # [B, T]
        video_logits = masked_max(av_gate[..., None] * raw[:, None, :], mask)
        out = {"cas": cas, "video_scores": raw, "video_logits": video_logits, "av_gate": av_gate}
        if self.weak_rule == "segment-argmax":
            return {**out, "segment_logits": cas}
        # Two-stage rules: shaped as the supervised head (log P(event) + the video's class scores | log P(background))
        # so that the argmax of segment_logits is the rule (the registry contract).
        _, event = self.weak_decision(out)
        shifted = (raw - raw.max(-1, keepdim=True).values)[:, None, :BACKGROUND]
        segment_logits = torch.cat([F.logsigmoid(event)[..., None] + shifted, F.logsigmoid(-event)[..., None]], -1)
        return {**out, "segment_logits": segment_logits}

    def weak_decision(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-stage weak rules from ``cas`` and ``video_scores``: (the video's class [B], the logit [B, T] of each
        second's event test, event exactly when > 0). Computed from the outputs as given, so on the outputs localize
        has masked (-inf on classes the checkpoint does not name) neither part can pick such a class.

        The video's class is the argmax of ``video_scores`` (29 classes). If it is background, every second is
        background: the logit is the best event score minus background's (<= 0). Otherwise ``"video-class"``: the
        video's class score minus the best other class score of the second's CAS (> 0 exactly when the video's class
        is the second's best class); ``"released"``: ``av_gate``, the score the released test feeds to a sigmoid and
        compares with 0.5 (in (0, 1), so every second passes)."""
        cas, raw = outputs["cas"], outputs["video_scores"]
        video_class = raw.argmax(-1)  # [B]
        if self.weak_rule == "released":
            per_second = outputs["av_gate"]
        else:
            own = cas.gather(-1, video_class[:, None, None].expand(-1, cas.shape[1], 1)).squeeze(-1)
            others = cas.scatter(-1, video_class[:, None, None].expand(-1, cas.shape[1], 1), float("-inf"))
            per_second = own - others.amax(-1)
        no_event = (raw[:, :BACKGROUND].amax(-1) - raw[:, BACKGROUND])[:, None].expand_as(per_second)
        return video_class, torch.where((video_class == BACKGROUND)[:, None], no_event, per_second)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        mask = batch["mask"]
        if task == "supervised":
            event = batch["event"].to(outputs["event_logits"].dtype)
            is_event = per_video_mean(F.binary_cross_entropy_with_logits(outputs["event_logits"], event,
                                                                         reduction="none"), mask)
            gate = outputs["av_gate"]
            if self.gate_loss == "bce":
                gate_bce = F.binary_cross_entropy(gate.clamp(1e-7, 1 - 1e-7), event, reduction="none")
            else:  # released supv_main.py: BCEWithLogitsLoss on the (already sigmoid) gate product
                gate_bce = F.binary_cross_entropy_with_logits(gate, event, reduction="none")
            category = event_category_loss(outputs["category_logits"], batch["video_label"])
            cas = event_category_loss(outputs["av_score"], batch["video_label"])
            return is_event + per_video_mean(gate_bce, mask) + category + cas
        if task == "weak":
            # Video labels only: softmax cross-entropy of the pooled video scores; "released": the released script's
            # MultiLabelSoftMarginLoss on their softmax (docs/models.md).
            if self.weak_loss == "released":
                return softmax_margin_loss(outputs["video_logits"], batch["video_label"])
            return F.cross_entropy(outputs["video_logits"], batch["video_label"])
        raise ValueError(f"CMBS has no loss for task {task!r}")

    def predict(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        if task == "supervised":
            category = outputs["category_logits"].argmax(-1, keepdim=True)
            event = outputs["event_logits"] > 0  # sigmoid > 0.5
            return torch.where(event, category, torch.full_like(category, BACKGROUND))
        if self.weak_rule == "segment-argmax":
            return outputs["cas"].argmax(-1)
        video_class, event = self.weak_decision(outputs)
        video_class = video_class[:, None].expand_as(event)
        return torch.where(event > 0, video_class, torch.full_like(video_class, BACKGROUND))

    def event_logits(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor | None:
        """The score [B, T] of predict's event/background decision (background when it is <= 0): supervised, the
        event head; weak, the weak rule's test (:meth:`weak_decision`); None for ``"segment-argmax"`` (predict is the
        argmax of the 29 CAS scores)."""
        if task == "supervised":
            return outputs["event_logits"]
        return None if self.weak_rule == "segment-argmax" else self.weak_decision(outputs)[1]
