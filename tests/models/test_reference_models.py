"""Whole-model slow references for AVEL (both fusions), AVSDN, DAM (SEL and CML, Eq. 1-8) and DMIN.

Written from the papers' text (/work/shared/papers, Tian et al. ECCV18 for AVEL) and docs/models.md, never from the
production code: explicit per-video, per-second (and per-position) loops in float64, LSTMs from their gate equations,
attention from softmax(q k / sqrt(d)) over the allowed keys, LayerNorm from mean and variance. Only the learned
weights are read from the modules. Each model runs on a padded batch (one video shorter than the other); the reference
sees only each video's real seconds, so padding leaks would show too.
"""

from __future__ import annotations

import math

import pytest
import torch

from avepipe.models.registry import build_model
from tests.models.common import SMALL_CONFIGS, move_layernorms, small_data

DT = torch.float64
LENGTHS = (10, 7)  # the second video is padded after 7 seconds


# ---- primitives ------------------------------------------------------------------------------------------------------


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def relu(x):
    return torch.clamp(x, min=0.0)


def linear(layer, x):
    """``W x + b`` of an nn.Linear read as plain matrices."""
    out = x @ layer.weight.T
    return out + layer.bias if layer.bias is not None else out


def layer_norm(norm, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def softmax(scores: list) -> torch.Tensor:
    x = torch.stack(scores)
    e = torch.exp(x - x.max())
    return e / e.sum()


def lstm_direction(lstm, x, layer: int, reverse: bool, h=None, c=None):
    """One direction of one layer of an nn.LSTM, gate by gate (i, f, g, o): c = f c + i g, h = o tanh(c)."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    w_ih, w_hh = getattr(lstm, "weight_ih" + suffix), getattr(lstm, "weight_hh" + suffix)
    bias = getattr(lstm, "bias_ih" + suffix) + getattr(lstm, "bias_hh" + suffix)
    hidden = w_hh.shape[1]
    h = torch.zeros(hidden, dtype=DT) if h is None else h
    c = torch.zeros(hidden, dtype=DT) if c is None else c
    outputs = [None] * x.shape[0]
    for t in (reversed(range(x.shape[0])) if reverse else range(x.shape[0])):
        z = w_ih @ x[t] + w_hh @ h + bias
        i, f = sigmoid(z[:hidden]), sigmoid(z[hidden:2 * hidden])
        g, o = torch.tanh(z[2 * hidden:3 * hidden]), sigmoid(z[3 * hidden:])
        c = f * c + i * g
        h = o * torch.tanh(c)
        outputs[t] = h
    return torch.stack(outputs), h, c


def lstm_ref(lstm, x, state=None):
    """nn.LSTM over one unpadded sequence x [T, D] -> (outputs [T, H * dirs], final (h, c) per layer-direction)."""
    dirs = 2 if lstm.bidirectional else 1
    finals = []
    for layer in range(lstm.num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            h0, c0 = (None, None) if state is None else (state[0][k], state[1][k])
            out, h, c = lstm_direction(lstm, x, layer, d == 1, h0, c0)
            outs.append(out)
            finals.append((h, c))
        x = torch.cat(outs, -1)
    return x, finals


def audio_guided_attention(att, visual, audio):
    """Tian et al. Sec. 3.2 per second: u_a = ReLU(U_a a), x_i = w_f . tanh(W_v ReLU(U_v v_i) + W_a u_a),
    w = softmax_i x_i, output sum_i w_i v_i. visual [T, N, Dv], audio [T, Da] -> [T, Dv]."""
    out = []
    for t in range(visual.shape[0]):
        u_a = relu(att.embed_audio.weight @ audio[t] + att.embed_audio.bias)
        scores = []
        for i in range(visual.shape[1]):
            u_v = relu(att.embed_visual.weight @ visual[t, i] + att.embed_visual.bias)
            hidden = torch.tanh(att.project_visual.weight @ u_v + att.project_audio.weight @ u_a)
            scores.append(att.score.weight[0] @ hidden)
        w = softmax(scores)
        out.append(sum(w[i] * visual[t, i] for i in range(visual.shape[1])))
    return torch.stack(out)


def two_layer(seq, x):
    """Linear - nonlinearity - Linear of an nn.Sequential, the nonlinearity written out from its type."""
    first, act, second = seq[0], seq[1], seq[2]
    h = linear(first, x)
    if isinstance(act, torch.nn.Tanh):
        h = torch.tanh(h)
    elif isinstance(act, torch.nn.LeakyReLU):
        h = torch.where(h >= 0, h, act.negative_slope * h)
    else:
        raise AssertionError(f"unexpected {act}")
    return linear(second, h)


def dmrn(block, h_a, h_v, combine: str):
    """AVEL's DMRN / AVSDN Eq. 2: m = (U_a h_a + U_v h_v) / 2, h' = tanh(h + m) per modality, mean or sum."""
    merged = 0.5 * (two_layer(block.update_audio, h_a) + two_layer(block.update_visual, h_v))
    fused = torch.tanh(h_a + merged) + torch.tanh(h_v + merged)
    return 0.5 * fused if combine == "mean" else fused


def inputs(seed: int, spatial: int = 3):
    """Two videos of the synthetic task, float64, 3x3 maps (the attention is position-count agnostic)."""
    data = small_data(2, seed=seed, min_event=2, max_event=6, spatial=spatial)
    mask = torch.arange(10)[None, :] < torch.tensor(LENGTHS)[:, None]
    return data["visual"].to(DT), data["audio"].to(DT), mask, data


def build(name: str, task: str, seed: int = 0, **variant):
    torch.manual_seed(seed)
    return build_model(name, task, {**SMALL_CONFIGS[name], **variant}).to(DT).eval()


def close(actual, expected):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-7, atol=1e-9)


# ---- the audio-guided spatial attention ------------------------------------------------------------------------------


def test_reference_audio_guided_attention():
    model = build("avel", "supervised")
    visual, audio, _, _ = inputs(1)
    attended, weights = model.attention(visual, audio)
    for b in range(2):
        close(attended[b], audio_guided_attention(model.attention, visual[b].flatten(1, 2), audio[b]))
    close(weights.sum(-1), torch.ones(2, 10, dtype=DT))


# ---- AVEL ------------------------------------------------------------------------------------------------------------


def avel_ref(model, visual, audio, length: int, fusion: str):
    """Tian et al.: attention -> BiLSTM per modality -> concat + MLP head, or DMRN + Linear; 29 logits a second."""
    v = audio_guided_attention(model.attention, visual[:length].flatten(1, 2), audio[:length])
    h_a, _ = lstm_ref(model.audio_lstm.lstm, audio[:length])
    h_v, _ = lstm_ref(model.visual_lstm.lstm, v)
    if fusion == "concat":
        x = relu(torch.cat([h_a, h_v], -1))
        return linear(model.head[3], relu(linear(model.head[1], x)))
    return linear(model.head, dmrn(model.dmrn, h_a, h_v, "mean"))


@pytest.mark.parametrize("fusion", ["concat", "dmrn"])
def test_reference_avel(fusion):
    model = build("avel", "weak", fusion=fusion)
    visual, audio, mask, data = inputs(2)
    out = model(visual, audio, mask)
    terms = []
    for b, length in enumerate(LENGTHS):
        logits = avel_ref(model, visual[b], audio[b], length, fusion)
        close(out["segment_logits"][b, :length], logits)
        close(out["video_logits"][b], logits.max(0).values)  # weak: MIL max over the real seconds
        terms += [-torch.log_softmax(logits[t], 0)[data["labels"][b, t]] for t in range(length)]
    # supervised loss: cross-entropy averaged over the real seconds of the batch
    close(model.loss(out, {"labels": data["labels"], "mask": mask}, "supervised"), torch.stack(terms).mean())


# ---- AVSDN -----------------------------------------------------------------------------------------------------------


def avsdn_ref(model, visual, audio, length: int):
    """Lin et al.: LSTM encoders (final h, c), Eq. 2 fusion with one shared g for h and one for c (sum), decoder LSTM
    over [a_t; v_t] from the fused state, FC -> 29; weak (Eq. 3): mean of the per-second logits."""
    v = audio_guided_attention(model.attention, visual[:length].flatten(1, 2), audio[:length])
    _, [(h_a, c_a)] = lstm_ref(model.audio_encoder.lstm, audio[:length])
    _, [(h_v, c_v)] = lstm_ref(model.visual_encoder.lstm, v)
    h0, c0 = dmrn(model.fuse_hidden, h_a, h_v, "sum"), dmrn(model.fuse_cell, c_a, c_v, "sum")
    decoded, _ = lstm_ref(model.decoder.lstm, torch.cat([audio[:length], v], -1), (h0[None], c0[None]))
    return linear(model.classifier, decoded)


def test_reference_avsdn():
    model = build("avsdn", "weak")
    visual, audio, mask, _ = inputs(3)
    out = model(visual, audio, mask)
    for b, length in enumerate(LENGTHS):
        logits = avsdn_ref(model, visual[b], audio[b], length)
        close(out["segment_logits"][b, :length], logits)
        close(out["video_logits"][b], logits.mean(0))


# ---- DAM (Wu et al. ICCV19, Eq. 1-8) ---------------------------------------------------------------------------------


def self_attention_mean(glob, x):
    """Eq. 1-4: phi = mean_t of one Transformer encoder layer over the given seconds x [L, D] (bias-free W_q, W_k, W_v,
    softmax(q k / sqrt(d_k)) per head, output projection, residual + LayerNorm, ReLU feed-forward + LayerNorm)."""
    n, d = x.shape
    heads = glob.heads
    dk = d // heads
    w_q, w_k, w_v = glob.qkv.weight[:d], glob.qkv.weight[d:2 * d], glob.qkv.weight[2 * d:]
    rows = []
    for i in range(n):
        per_head = []
        for h in range(heads):
            cols = slice(h * dk, (h + 1) * dk)
            q = w_q[cols] @ x[i]
            w = softmax([q @ (w_k[cols] @ x[j]) / math.sqrt(dk) for j in range(n)])
            per_head.append(sum(w[j] * (w_v[cols] @ x[j]) for j in range(n)))
        rows.append(torch.cat(per_head))
    h1 = layer_norm(glob.norm1, x + linear(glob.proj, torch.stack(rows)))
    ff = linear(glob.ff[3], relu(linear(glob.ff[0], h1)))
    return layer_norm(glob.norm2, h1 + ff).mean(0)


def dam_sel_ref(model, visual, audio, length: int):
    """Returns (p_t [L], category logits [28]): Eq. 5-7 with the other modality's global feature."""
    f_a, _ = lstm_ref(model.audio_local.lstm, audio[:length])
    v = audio_guided_attention(model.attention, visual[:length].flatten(1, 2), audio[:length])
    f_v, _ = lstm_ref(model.visual_local.lstm, v)
    phi_a, phi_v = self_attention_mean(model.audio_global, f_a), self_attention_mean(model.visual_global, f_v)
    p_a = torch.stack([sigmoid(phi_v @ f_a[t]) for t in range(length)])  # Eq. 5
    p_v = torch.stack([sigmoid(phi_a @ f_v[t]) for t in range(length)])  # Eq. 6
    return 0.5 * (p_a + p_v), linear(model.classifier, torch.cat([phi_a, phi_v]))  # Eq. 7, category from [phi_A; phi_V]


def test_reference_dam_sel_eq_1_to_8():
    model = build("dam", "supervised")
    visual, audio, mask, data = inputs(4)
    out = model(visual, audio, mask)
    batch = {"mask": mask, "event": data["event"].to(DT) * mask, "video_label": data["video_label"]}
    pred = model.predict(out, "supervised")
    relevance_terms, category_terms = [], []
    for b, length in enumerate(LENGTHS):
        p, category = dam_sel_ref(model, visual[b], audio[b], length)
        close(out["relevance"][b, :length], p)
        close(out["category_logits"][b], category)
        rule = torch.where(p >= 0.5, category.argmax(), torch.tensor(28))  # background iff p_t < 0.5
        assert torch.equal(pred[b, :length], rule)
        y = batch["event"][b, :length]
        relevance_terms.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())  # (1/N) sum_t L_t^r
        category_terms.append(-torch.log_softmax(category, 0)[data["video_label"][b]])  # L^c (every video has events)
    lam = model.lambda_category
    expected = lam * torch.stack(category_terms).mean() + (1 - lam) * torch.stack(relevance_terms).mean()  # Eq. 8
    close(model.loss(out, batch, "supervised"), expected)


def dam_cml_ref(model, visual, audio, length: int, query: torch.Tensor, direction: str):
    """Sec. 3.3: phi of the query seconds (one modality) against every candidate second's local feature (the other).
    The candidate visual attention is guided by one vector: the query's mean audio (A2V) or the mean candidate audio
    (V2A), as docs/models.md says; local features are AVEL's matching MLPs."""
    seconds = [t for t in range(length) if query[t]]
    maps = visual[:length].flatten(1, 2)
    if direction == "a2v":
        guide = audio[seconds].mean(0)
        phi = self_attention_mean(model.audio_global,
                                  torch.stack([two_layer(model.audio_local, audio[t]) for t in seconds]))
        att = audio_guided_attention(model.attention, maps, guide.expand(length, -1))
        local = [two_layer(model.visual_local, att[t]) for t in range(length)]
    else:
        guide = audio[:length].mean(0)
        att = audio_guided_attention(model.attention, maps[seconds], guide.expand(len(seconds), -1))
        phi = self_attention_mean(model.visual_global, torch.stack([two_layer(model.visual_local, x) for x in att]))
        local = [two_layer(model.audio_local, audio[t]) for t in range(length)]
    return torch.stack([phi @ f for f in local])  # the argument of sigma in Eq. 5 / 6


def test_reference_dam_cml_and_its_losses():
    model = build("dam", "cml")
    visual, audio, mask, data = inputs(5)
    query = data["event"].bool() & mask
    batch = {"mask": mask, "target_mask": query}
    logits = {}
    for direction in ("a2v", "v2a"):
        out = model.forward_cml(visual, audio, mask, query, direction)
        logits[direction] = out["match_logits"]
        terms = []
        for b, length in enumerate(LENGTHS):
            ref = dam_cml_ref(model, visual[b], audio[b], length, query[b], direction)
            close(out["match_logits"][b, :length], ref)
            assert (out["match_logits"][b, length:] < -1e3).all()  # padded seconds never win a window
            y, p = query[b, :length].to(DT), sigmoid(ref)
            terms.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())
        close(model.loss(out, batch, "cml"), torch.stack(terms).mean())
    # --direction both (Eq. 7 on the two directions): p_t = (sigma(x_t) + sigma(y_t)) / 2, one BCE.
    joint = model.forward_cml(visual, audio, mask, query, "both")
    terms = []
    for b, length in enumerate(LENGTHS):
        p = 0.5 * (sigmoid(logits["a2v"][b, :length]) + sigmoid(logits["v2a"][b, :length]))
        y = query[b, :length].to(DT)
        terms.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())
    close(model.loss(joint, batch, "cml"), torch.stack(terms).mean())


# ---- DMIN (Liu et al. TMM22): the whole model from its block references ----------------------------------------------


def agta_ref(agta, visual, audio):
    """AGTA Eq. 1-8 on one video's real seconds: visual [L, N, Dv], audio [L, Da] -> v^S [L, Dv]."""
    length, n = visual.shape[:2]
    ca, mfb, tmp = agta.channel, agta.mfb, agta.temporal
    v_c, m_c = [], []
    for t in range(length):
        joint = torch.stack([relu(linear(ca.audio, audio[t])) * relu(linear(ca.visual, visual[t, s]))
                             for s in range(n)]).mean(0)  # AVP over the positions
        weight = sigmoid(linear(ca.excite, relu(linear(ca.squeeze, joint))))  # Eq. 1
        m_c.append(weight)
        v_c.append(weight * visual[t])  # Eq. 2
    v_c = torch.stack(v_c)
    a_p = relu(linear(tmp.audio, audio))  # Eq. 5
    temporal = []
    for s in range(n):
        seq = torch.cat([relu(linear(tmp.visual, v_c[:, s])) + a_p, a_p], -1)
        temporal.append(lstm_ref(tmp.lstm.lstm, seq)[0])  # Eq. 6: one BiLSTM over the seconds per position
    out = []
    for t in range(length):
        scores = []
        for s in range(n):
            z = relu(linear(mfb.audio, audio[t])) * relu(linear(mfb.visual, v_c[t, s]))  # Eq. 3
            z = torch.stack([z[o * mfb.factor:(o + 1) * mfb.factor].sum() for o in range(mfb.out_dim)])  # SP(., k)
            z = torch.sign(z) * torch.sqrt(z.abs())  # Eq. 4 power normalisation
            z = z / z.norm().clamp_min(1e-12)  # L2
            scores.append(torch.tanh(linear(agta.score, z + temporal[s][t]))[0])  # Eq. 7
        w = softmax(scores)
        out.append(sum(w[s] * v_c[t, s] for s in range(n)))  # Eq. 8
    return torch.stack(out), torch.stack(m_c)


def attention_ref(att, query, x, y=None):
    """Eq. 9 / 11 / 14 on unpadded sequences: per head, softmax over the keys cat(x, y) of scaled scores, where the
    y keys score FCPP(q, k) = sum_{m,n} W_mn q_m k_n (W_mm = alpha, else (1 - alpha) / (d_k - 1)) when the attention
    is dense (DIMA), q . k otherwise; then W^O."""
    d = query.shape[-1]
    dk = d // att.heads
    keys = x if y is None else torch.cat([x, y])
    dense = torch.full((dk, dk), 0.0, dtype=DT)
    if att.dense_alpha is not None:
        dense = torch.full((dk, dk), (1 - att.dense_alpha) / (dk - 1), dtype=DT).fill_diagonal_(att.dense_alpha)
    rows = []
    for i in range(query.shape[0]):
        per_head = []
        for h in range(att.heads):
            cols = slice(h * dk, (h + 1) * dk)
            q = att.query.weight[cols] @ query[i]
            k = [att.key.weight[cols] @ keys[j] for j in range(len(keys))]
            scores = []
            for j in range(len(keys)):
                if j >= len(x) and att.dense_alpha is not None:
                    scores.append((torch.outer(q, k[j]) * dense).sum() / math.sqrt(dk))
                else:
                    scores.append(q @ k[j] / math.sqrt(dk))
            w = softmax(scores)
            per_head.append(sum(w[j] * (att.value.weight[cols] @ keys[j]) for j in range(len(keys))))
        rows.append(torch.cat(per_head))
    return linear(att.out, torch.stack(rows))


def block_ref(block, query, x, y=None):
    """Eq. 10: LayerNorm(query + attention), then LayerNorm(h + W_5 ReLU(W_4 h)) when the block has a feed-forward."""
    h = layer_norm(block.norm1, query + attention_ref(block.attention, query, x, y))
    if block.ff is not None:
        h = layer_norm(block.norm2, h + linear(block.ff[3], relu(linear(block.ff[0], h))))
    return h


def dmin_ref_forward(model, visual, audio, length: int):
    """Sec. IV: AGTA -> T_a / T_v -> encoders (a_self, v_self) -> DIMA(a, v_self), DIMA(v, a_self) -> F_av = a_cross *
    v_cross -> fusion (Eq. 14) F_o -> relevance (Eq. 15), category of max_t F_o and of max_t v_self (Eq. 16)."""
    attended, _ = agta_ref(model.agta, visual[:length].flatten(1, 2), audio[:length])
    inter = model.interaction
    t_a, t_v = linear(inter.audio_proj, audio[:length]), linear(inter.visual_proj, attended)
    a_self, v_self = t_a, t_v
    for layer in inter.audio_encoder.layers:
        a_self = block_ref(layer, a_self, a_self)
    for layer in inter.visual_encoder.layers:
        v_self = block_ref(layer, v_self, v_self)
    a_cross = block_ref(inter.audio_dima, t_a, t_a, v_self)  # Eq. 11: audio queries over [a; v_self]
    v_cross = block_ref(inter.visual_dima, t_v, t_v, a_self)
    f_av = a_cross * v_cross
    f_o = block_ref(model.fusion, f_av, a_cross, v_cross)
    return {"relevance_logits": linear(model.relevance, f_o)[:, 0],
            "category_logits": linear(model.category, f_o.max(0).values),
            "visual_category_logits": linear(model.visual_category, v_self.max(0).values),
            "v_self": v_self}


@pytest.mark.parametrize("task", ["supervised", "weak"])
def test_reference_dmin_forward(task):
    model = move_layernorms(build("dmin", task))
    visual, audio, mask, _ = inputs(6)
    out = model(visual, audio, mask)
    pred = model.predict(out, task)
    for b, length in enumerate(LENGTHS):
        ref = dmin_ref_forward(model, visual[b], audio[b], length)
        for key in ("relevance_logits", "category_logits", "visual_category_logits"):
            close(out[key][b, :length] if key == "relevance_logits" else out[key][b], ref[key])
        rule = torch.where(ref["relevance_logits"] >= 0, ref["category_logits"].argmax(), torch.tensor(28))
        assert torch.equal(pred[b, :length], rule)
        if task == "weak":  # MIL: P_c = max_t s_t softmax(category)_c, P_bg = max_t (1 - s_t), as logits
            s = sigmoid(ref["relevance_logits"])
            probs = torch.cat([s[:, None] * torch.softmax(ref["category_logits"], 0)[None, :], (1 - s)[:, None]], 1)
            video = probs.max(0).values
            torch.testing.assert_close(torch.sigmoid(out["video_logits"][b]), video, rtol=1e-5, atol=1e-6)
