"""DMIN and DCMR: Liu, Quan, Wang, Liu, Liu, Yan, "Dense Modality Interaction Network for Audio-Visual Event
Localization", IEEE TMM 2022.

* ``dmin`` (supervised, weak): AGTA (Eq. 1-8) turns each 7x7 map into one audio-guided visual vector; linear
  projections to d_m and one transformer encoder per modality (Eq. 9-10) give ``a_self``, ``v_self``; DIMA (Eq. 11-13)
  gives ``a_cross = DIMA(a, v_self)`` and ``v_cross = DIMA(v, a_self)``; the fusion module (Eq. 14) gives ``F_o``.
  Event relevance per second from ``F_o``; event category from the max over time of ``F_o`` and, for the unimodal
  discrimination loss (UDL), of ``v_self`` (Eq. 15-18).
* ``dcmr`` (cml): no AGTA (spatially averaged visual vectors) and no fusion module; the channel mean of the query
  modality's cross features over the query seconds slides over the candidate modality's cross features (Eq. 19).

Blocks are in :mod:`avepipe.models.dmin_blocks`; the equation -> code map and every choice are in the DMIN section of
the models docs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avepipe.models.dmin_blocks import (
    AttentionBlock,
    AudioGuidedTripletAttention,
    Encoder,
    sliding_query_product,
    sliding_query_weights,
)
from avepipe.models.layers import (
    event_category_loss,
    lengths_from_mask,
    masked_max,
    mil_pool,
    per_video_mean,
    softmax_margin_loss,
    span_match_loss,
    zero_padded,
)
from avepipe.models.registry import register

NUM_CLASSES = 29
BACKGROUND = 28
PAD_SCORE = -1e4  # CML score of padded seconds (as dam.PAD_SCORE): finite, never inside a winning window
# log P is shifted this far below 0 so that logit(P) and -log(1 - P) stay finite at P = 1 (a shift, not a clamp: the
# gradient of a saturated wrong prediction must not vanish).
_LOG_P_SHIFT = 1e-6

PAPER = ("Liu, Quan, Wang, Liu, Liu, Yan. Dense Modality Interaction Network for Audio-Visual Event Localization. "
         "IEEE TMM 2022")
# Training recipe of Sec. VI-B: Adam, batch 32, lr 5e-5 halved every 10 epochs and fixed after 30. The epoch count and
# gradient clipping are the released training scripts' (200 epochs, clip 0.1).
TRAIN = {"optimizer": "adam", "lr": 5e-5, "batch_size": 32, "epochs": 200, "lr_milestones": [10, 20, 30],
         "lr_gamma": 0.5, "grad_clip": 0.1}
TRANSFORMER = {
    "model_dim": 256,  # d_m (released code)
    "heads": 4,  # n = 4 (Eq. 9, 11)
    "ff_dim": 2048,  # W_4 / W_5 width (released code: PyTorch's default)
    "encoder_layers": 2,  # released code
    "dropout": 0.1,  # encoder and fusion (released code)
    "dima_dropout": 0.02,  # DIMA layer (released code)
    "alpha": 0.5,  # FCPP diagonal weight (Sec. IV-C)
    "dfa_scale": "paper",  # FCPP / sqrt(d_k); "released": FCPP / (d_k sqrt(d_k)) (mean over the d_k channel rolls)
    "dima_projection": "shared",  # DIMA query = the encoder's T_a / T_v; "own": its own Linear (released decoder)
    "attention_bias": False,  # W^Q, W^K, W^V without bias (Eq. 9, 11); released: with (in_proj_bias)
}
# What weizequan/DMIN (DIMN/, DCMR/) does; docs/models.md "Presets" has the table with files and lines.
RELEASED_TRANSFORMER = {"dfa_scale": "released", "dima_projection": "own", "attention_bias": True}


class _Interaction(nn.Module):
    """What DMIN and DCMR share: projections to d_m, one encoder per modality and one DIMA per modality."""

    def __init__(self, visual_dim, audio_dim, model_dim, heads, ff_dim, encoder_layers, dropout, dima_dropout, alpha,
                 dfa_scale="paper", dima_projection="shared", attention_bias=False):
        super().__init__()
        if dima_projection not in ("shared", "own"):
            raise ValueError(f"unknown dima_projection {dima_projection!r} (expected 'shared' or 'own')")
        self.audio_proj = nn.Linear(audio_dim, model_dim)  # T_a
        self.visual_proj = nn.Linear(visual_dim, model_dim)  # T_v
        self.audio_encoder = Encoder(model_dim, heads, ff_dim, dropout, encoder_layers, attention_bias)
        self.visual_encoder = Encoder(model_dim, heads, ff_dim, dropout, encoder_layers, attention_bias)
        self.audio_dima = AttentionBlock(model_dim, heads, ff_dim, dima_dropout, dense_alpha=alpha,
                                         dense_scale=dfa_scale, bias=attention_bias)
        self.visual_dima = AttentionBlock(model_dim, heads, ff_dim, dima_dropout, dense_alpha=alpha,
                                          dense_scale=dfa_scale, bias=attention_bias)
        if dima_projection == "own":  # released CrossModalRelationAttModule.affine_matrix: the decoder's own input FC
            self.audio_dima_proj = nn.Linear(audio_dim, model_dim)
            self.visual_dima_proj = nn.Linear(visual_dim, model_dim)

    def forward(self, visual, audio, visual_keys, audio_keys):
        """visual [B, T, Dv], audio [B, T, Da]; ``*_keys`` [B, T] mark the seconds of each modality that may be
        attended to. Returns (a_self, v_self, a_cross, v_cross), each [B, T, d_m]."""
        t_a, t_v = self.audio_proj(audio), self.visual_proj(visual)
        a_self, v_self = self.audio_encoder(t_a, audio_keys), self.visual_encoder(t_v, visual_keys)
        if hasattr(self, "audio_dima_proj"):
            t_a, t_v = self.audio_dima_proj(audio), self.visual_dima_proj(visual)
        a_cross = self.audio_dima(t_a, t_a, audio_keys, v_self, visual_keys)  # DIMA(a, v_self)
        v_cross = self.visual_dima(t_v, t_v, visual_keys, a_self, audio_keys)  # DIMA(v, a_self)
        return a_self, v_self, a_cross, v_cross



def segment_scores(relevance: torch.Tensor, category_logits: torch.Tensor) -> torch.Tensor:
    """[B, T, 29] scores whose argmax is the paper's rule (s_t >= 0.5: the video's category, else background).

    The top category scores log s_t, the other categories less, background log(1 - s_t)."""
    shifted = category_logits - category_logits.max(-1, keepdim=True).values
    event = F.logsigmoid(relevance)[..., None] + shifted[:, None, :]
    return torch.cat([event, F.logsigmoid(-relevance)[..., None]], -1)


def released_segment_scores(relevance: torch.Tensor, category_logits: torch.Tensor) -> torch.Tensor:
    """[B, T, 29] scores whose argmax is the released weak rule (weakly_main.py, compute_accuracy_supervised):
    sigma(r_t) > 0.5: argmax of the 29 category logits (which may be background), else background."""
    shifted = category_logits - category_logits.max(-1, keepdim=True).values
    event = F.logsigmoid(relevance)[..., None] + shifted[:, None, :]
    background = torch.maximum(event[..., BACKGROUND], F.logsigmoid(-relevance))
    return torch.cat([event[..., :BACKGROUND], background[..., None]], -1)


def mil_video_logits(relevance: torch.Tensor, category_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weak setting: MIL max pooling of per-second class probabilities into video logits [B, 29].

    Per second ``p_{t,c} = s_t softmax(category)_c`` for the 28 events and ``p_{t,bg} = 1 - s_t``; the video
    probability of each class is its best second, ``P_c = max_t p_{t,c}``; returned as ``logit(P_c)``."""
    log_p = torch.cat([F.logsigmoid(relevance)[..., None] + category_logits.log_softmax(-1)[:, None, :],
                       F.logsigmoid(-relevance)[..., None]], -1)
    log_video = mil_pool(log_p, mask, "max") - _LOG_P_SHIFT
    return log_video - torch.log(-torch.expm1(log_video))


def released_weak_logits(relevance: torch.Tensor, category_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The released weak head (DIMN/model/weakly_main_model.py, ``WeaklyLocalizationModule``): 29-class logits ``c``
    of the max-pooled features times ``sigma(r_t)``, max over the seconds: [B, 29] (a softmax and the multi-label soft
    margin loss follow in :func:`~avepipe.models.layers.softmax_margin_loss`, as DIMN/weakly_main.py trains it)."""
    return mil_pool(torch.sigmoid(relevance)[..., None] * category_logits[:, None, :], mask, "max")


def mil_loss(video_logits: torch.Tensor, video_label: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss of the MIL-pooled video logits against the video label, per video then averaged.

    Event videos: target 1 for their category, 0 for the other 27; their background class is left out, since an event
    video usually has background seconds too and the label does not say. Background-only videos: 1 for background, 0
    for the 28 events."""
    target = F.one_hot(video_label, NUM_CLASSES).to(video_logits.dtype)
    weight = torch.ones_like(target)
    weight[:, BACKGROUND] = (video_label == BACKGROUND).to(video_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(video_logits, target, reduction="none")
    return ((bce * weight).sum(1) / weight.sum(1)).mean()


@register(
    "dmin",
    tasks=("supervised", "weak"),
    paper=PAPER,
    default_config={
        "model": {
            "visual_dim": 512,
            "audio_dim": 128,
            "channel_bottleneck": 256,  # d in Eq. 1
            "agta_dim": 256,  # d_o (released code)
            "mfb_factor": 5,  # k in Eq. 3 (released code: 1280 = 5 x 256)
            "mfb_dropout": 0.1,  # released code
            "mfb_dropout_at": "pooled",  # D(SP(.)), Eq. 4; "product": before the sum pooling (released MFB)
            "agta_lstm_layers": 2,  # released code
            **TRANSFORMER,
            "fusion_heads": 4,  # Eq. 14 attention (released supervised code)
            "lambda_supervised": 0.1,  # UDL weight, Table VI best (fully supervised)
            "lambda_weak": 0.08,  # UDL weight, Table VI best (weakly supervised)
            "channel_residual": False,  # Eq. 2 v^C = M^C * v; released: (1 + M^C) * v
            "input_fc": False,  # released: Linear(Dv, Dv) + ReLU + Dropout(0.2) on the pool5 maps before AGTA
            "weak_head": "paper",  # released: max_t sigma(r_t) c (29 classes), softmax, multi-label soft margin
        },
        "train": dict(TRAIN),
    },
    presets={"released": {
        "model": {**RELEASED_TRANSFORMER, "channel_residual": True, "input_fc": True, "weak_head": "released",
                  "mfb_dropout_at": "product"},
        "train": {"lr": 5e-4},  # supv_train.sh / weakly_train.sh: --lr 0.0005
        # weakly_main.py: MultiStepLR([5, 20, 40], 0.5); weakly_train.sh passes no --clip_gradient, so
        # configs/default_config.yaml's clip_gradient 0.5 applies (utils.get_and_save_args, parser.set_defaults);
        # weakly_main_model.py: AudioVideoInter(n_head=2); weakly_models.py: DecoderLayer(dropout=0.1)
        "tasks": {"weak": {"model": {"fusion_heads": 2, "dima_dropout": 0.1},
                           "train": {"lr_milestones": [5, 20, 40], "grad_clip": 0.5}}},
    }},
    published={"supervised": 79.6, "weak": 74.3, "selection": "test",
               "source": "DMIN Table I (released supv_main.py / weakly_main.py keep the best epoch on test)"},
)
class DMIN(nn.Module):
    def __init__(self, task: str, *, visual_dim=512, audio_dim=128, channel_bottleneck=256, agta_dim=256, mfb_factor=5,
                 mfb_dropout=0.1, agta_lstm_layers=2, model_dim=256, heads=4, ff_dim=2048, encoder_layers=2,
                 dropout=0.1, dima_dropout=0.02, alpha=0.5, fusion_heads=4, lambda_supervised=0.1, lambda_weak=0.08,
                 dfa_scale="paper", dima_projection="shared", channel_residual=False, input_fc=False,
                 weak_head="paper", attention_bias=False, mfb_dropout_at="pooled"):
        super().__init__()
        if task not in ("supervised", "weak"):
            raise ValueError(f"DMIN supports the supervised and weak tasks, not {task!r} (dcmr is its CML variant)")
        if weak_head not in ("paper", "released"):
            raise ValueError(f"unknown weak_head {weak_head!r} (expected 'paper' or 'released')")
        self.task = task
        self.released_weak = task == "weak" and weak_head == "released"
        if input_fc:  # released supv_main_model.v_fc: "optional ... adaptive to different visual features"
            self.input_fc = nn.Sequential(nn.Linear(visual_dim, visual_dim), nn.ReLU(), nn.Dropout(0.2))
        self.udl_lambda = lambda_supervised if task == "supervised" else lambda_weak
        self.agta = AudioGuidedTripletAttention(
            visual_dim, audio_dim, bottleneck=channel_bottleneck, out_dim=agta_dim, factor=mfb_factor,
            mfb_dropout=mfb_dropout, lstm_layers=agta_lstm_layers, channel_residual=channel_residual,
            mfb_dropout_at=mfb_dropout_at)
        self.interaction = _Interaction(visual_dim, audio_dim, model_dim, heads, ff_dim, encoder_layers, dropout,
                                        dima_dropout, alpha, dfa_scale, dima_projection, attention_bias)
        self.fusion = AttentionBlock(model_dim, fusion_heads, 0, dropout, feed_forward=False,
                                     bias=attention_bias)  # Eq. 14, DPA
        self.relevance = nn.Linear(model_dim, 1)  # FC of Eq. 15 on F_o
        classes = NUM_CLASSES if self.released_weak else NUM_CLASSES - 1  # released weak head: 29 classes
        self.category = nn.Linear(model_dim, classes)  # FC of Eq. 16 on max-pooled F_o (L_eco)
        self.visual_category = nn.Linear(model_dim, classes)  # FC of Eq. 16 on max-pooled v_self (L_ecm)
        if task == "weak":
            self.visual_relevance = nn.Linear(model_dim, 1)  # relevance of v_self, for its MIL prediction

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        lengths_from_mask(mask)
        visual, audio = zero_padded(visual, mask), zero_padded(audio, mask)
        if hasattr(self, "input_fc"):
            visual = self.input_fc(visual)
        attended, spatial_map, channel_map = self.agta(visual, audio, mask)
        _, v_self, a_cross, v_cross = self.interaction(attended, audio, mask, mask)
        f_av = a_cross * v_cross
        f_o = self.fusion(f_av, a_cross, mask, v_cross, mask)  # LayerNorm(F_av + O)
        relevance = self.relevance(f_o).squeeze(-1)  # [B, T]
        category = self.category(masked_max(f_o, mask))  # [B, 28]
        visual_category = self.visual_category(masked_max(v_self, mask))
        out = {
            "segment_logits": (released_segment_scores if self.released_weak else segment_scores)(relevance, category),
            "relevance_logits": relevance,
            "category_logits": category,
            "visual_category_logits": visual_category,
            "spatial_attention": spatial_map,
            "channel_attention": channel_map,
        }
        if self.task == "weak":
            visual_relevance = self.visual_relevance(v_self).squeeze(-1)
            pool = released_weak_logits if self.released_weak else mil_video_logits
            out["video_logits"] = pool(relevance, category, mask)
            out["video_logits_visual"] = pool(visual_relevance, visual_category, mask)
        return out

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        lam, labels = self.udl_lambda, batch["video_label"]
        if task == "weak":  # Eq. 18
            weak = softmax_margin_loss if self.released_weak else mil_loss
            visual_loss = weak(outputs["video_logits_visual"], labels)
            fused_loss = weak(outputs["video_logits"], labels)
            return lam * visual_loss + (1 - lam) * fused_loss
        if task != "supervised":
            raise ValueError(f"DMIN has no loss for task {task!r}")
        event = batch["event"].to(outputs["relevance_logits"].dtype)
        bce = F.binary_cross_entropy_with_logits(outputs["relevance_logits"], event, reduction="none")
        relevance = per_video_mean(bce, batch["mask"])  # Eq. 15
        # Eq. 17: L_ero + lambda L_ecm (v_self, the UDL) + (1 - lambda) L_eco (F_o)
        visual_category = event_category_loss(outputs["visual_category_logits"], labels)
        return relevance + lam * visual_category + (1 - lam) * event_category_loss(outputs["category_logits"], labels)

    def predict(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        category = outputs["category_logits"].argmax(-1, keepdim=True)  # [B, 1]
        return torch.where(outputs["relevance_logits"] >= 0, category, torch.full_like(category, BACKGROUND))

    def event_logits(self, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """The logit of predict's event/background decision [B, T] (background exactly when it is < 0): logit(s_t);
        with the released weak head (29 categories) an event also needs its best event category to beat the
        background category, so the smaller of the two margins."""
        relevance = outputs["relevance_logits"]
        category = outputs["category_logits"]
        if category.shape[-1] <= BACKGROUND:
            return relevance
        margin = category[..., :BACKGROUND].max(-1).values - category[..., BACKGROUND]  # [B]
        return torch.minimum(relevance, margin[:, None])


@register(
    "dcmr",
    tasks=("cml",),
    paper=PAPER,
    default_config={"model": {"visual_dim": 512, "audio_dim": 128, **TRANSFORMER,
                              # "leak-free": the query modality is seen only on its query seconds (avepipe's default);
                              # "paper": both whole sequences are encoded, background dropped afterwards, and the
                              # released sliding-window product (DCMR/model/main_model_a2v.py, AudioVideoInter)
                              "cml_protocol": "leak-free"},
                    "train": dict(TRAIN)},
    presets={"released": {"model": {**RELEASED_TRANSFORMER, "cml_protocol": "paper"},
                          "train": {"lr": 5e-4}}},  # DCMR/supv_train_a2v.sh: --lr 0.0005 --clip_gradient 0.1
    published={"cml-a2v": 56.0, "cml-v2a": 56.2, "selection": "test",
               "source": "DMIN Table II (released DCMR keeps the best test epoch; its query sees the whole sequence)"},
)
class DCMR(nn.Module):
    CML_PROTOCOLS = ("leak-free", "paper")

    def __init__(self, task: str, *, visual_dim=512, audio_dim=128, model_dim=256, heads=4, ff_dim=2048,
                 encoder_layers=2, dropout=0.1, dima_dropout=0.02, alpha=0.5, dfa_scale="paper",
                 dima_projection="shared", cml_protocol="leak-free", attention_bias=False):
        super().__init__()
        if task != "cml":
            raise ValueError(f"DCMR supports the cml task only, not {task!r} (dmin is its SEL variant)")
        if cml_protocol not in self.CML_PROTOCOLS:
            raise ValueError(f"unknown cml_protocol {cml_protocol!r} (expected 'leak-free' or 'paper')")
        self.task, self.cml_protocol = task, cml_protocol
        self.interaction = _Interaction(visual_dim, audio_dim, model_dim, heads, ff_dim, encoder_layers, dropout,
                                        dima_dropout, alpha, dfa_scale, dima_projection, attention_bias)
        # Event-relevance FC (Eq. 15) on the cross-matched candidate features; one per direction, since the candidates
        # are v_cross in A2V and a_cross in V2A (the released code trains one network per direction).
        self.match = nn.ModuleDict({"a2v": nn.Linear(model_dim, 1), "v2a": nn.Linear(model_dim, 1)})

    def forward(self, *args, **kwargs):
        raise RuntimeError("DCMR is the cross-modality localization network; call forward_cml")

    def forward_cml(self, visual: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor, query_mask: torch.Tensor,
                    direction: str) -> dict[str, torch.Tensor]:
        if direction not in self.match:
            raise ValueError(f"direction must be 'a2v' or 'v2a', not {direction!r}")
        lengths_from_mask(mask)
        query = query_mask & mask
        if bool((query.sum(1) == 0).any()):
            raise ValueError("every video needs at least one query second")
        visual = zero_padded(visual, mask)
        visual = visual.flatten(2, -2).mean(2) if visual.dim() > 3 else visual  # spatial average (Sec. VI-B)
        audio = zero_padded(audio, mask)
        if self.cml_protocol == "paper":
            # As the released code: both whole sequences (the query modality's background seconds included) are
            # encoded; the query's background is dropped only afterwards, then the sliding-window product.
            _, _, a_cross, v_cross = self.interaction(visual, audio, mask, mask)
            query_cross, candidate = (a_cross, v_cross) if direction == "a2v" else (v_cross, a_cross)
            weights = sliding_query_product(query_cross.mean(-1), query, mask)
            scores = self.match[direction](weights.unsqueeze(-1) * candidate).squeeze(-1)
            return {"match_logits": scores.masked_fill(~mask, PAD_SCORE), "query_weights": weights}
        # The query modality is blanked outside the query and only its query seconds are keys, so nothing else of it
        # reaches any output; the candidate modality is visible on all real seconds.
        if direction == "a2v":
            audio, audio_keys, visual_keys = zero_padded(audio, query), query, mask
        else:
            visual, audio_keys, visual_keys = zero_padded(visual, query), mask, query
        _, _, a_cross, v_cross = self.interaction(visual, audio, visual_keys, audio_keys)
        query_cross, candidate = (a_cross, v_cross) if direction == "a2v" else (v_cross, a_cross)
        weights = sliding_query_weights(query_cross.mean(-1), query, mask)  # channel mean, then Eq. 19
        scores = self.match[direction](weights.unsqueeze(-1) * candidate).squeeze(-1)
        return {"match_logits": scores.masked_fill(~mask, PAD_SCORE), "query_weights": weights}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        if task != "cml":
            raise ValueError(f"DCMR has no loss for task {task!r}")
        return span_match_loss(outputs["match_logits"], batch["target_mask"], batch["mask"])  # Eq. 15 on candidates
