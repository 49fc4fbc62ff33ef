"""DMIN / DCMR (Liu et al. TMM 2022): each equation block against a slow reference written from the paper's formula,
shapes at real dims, masks, CML query leakage, gradient flow, and learning the synthetic SEL / weak / CML tasks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avepipe.data.synthetic import make_synthetic_ave
from avepipe.models.dmin import BACKGROUND, DCMR, DMIN, mil_video_logits
from avepipe.models.dmin_blocks import (
    AudioGuidedTripletAttention,
    DenseAttention,
    MFBCorrelation,
    full_channel_pair_scores,
    signed_sqrt,
    sliding_query_weights,
)
from avepipe.models.registry import build_model, get_spec, parameter_count
from tests.models.common import (
    SMALL_CONFIGS,
    exact_match,
    forward,
    make_batch,
    move_layernorms,
    segment_accuracy,
    small_data,
    split,
    train,
)

# Small widths for everything but the real-dims tests (the learning tests must stay within the CI budget).
SMALL_CML, SMALL = SMALL_CONFIGS["dcmr"], SMALL_CONFIGS["dmin"]


@pytest.fixture(scope="module")
def real_models():
    torch.manual_seed(0)
    return {task: build_model("dmin", task).eval() for task in ("supervised", "weak")} | {
        "cml": move_layernorms(build_model("dcmr", "cml")).eval()}


# ---- registry and shapes ---------------------------------------------------------------------------------------------


def test_registered_with_paper_defaults():
    dmin, dcmr = get_spec("dmin"), get_spec("dcmr")
    assert dmin.cls is DMIN and dmin.tasks == ("supervised", "weak")
    assert dcmr.cls is DCMR and dcmr.tasks == ("cml",)
    cfg = dmin.default_config["model"]
    assert (cfg["lambda_supervised"], cfg["lambda_weak"], cfg["alpha"], cfg["heads"]) == (0.1, 0.08, 0.5, 4)
    for spec in (dmin, dcmr):
        train_cfg = spec.default_config["train"]
        assert (train_cfg["optimizer"], train_cfg["lr"], train_cfg["batch_size"]) == ("adam", 5e-5, 32)
        assert (train_cfg["lr_milestones"], train_cfg["lr_gamma"]) == ([10, 20, 30], 0.5)
    assert build_model("dmin", "supervised", SMALL).udl_lambda == 0.1
    assert build_model("dmin", "weak", SMALL).udl_lambda == 0.08
    with pytest.raises(ValueError):
        build_model("dmin", "cml")
    with pytest.raises(ValueError):
        build_model("dcmr", "supervised")


@pytest.mark.parametrize("seconds", [10, 3])
@pytest.mark.parametrize("task", ["supervised", "weak"])
def test_shapes_real_dims(real_models, seconds, task):
    data = make_synthetic_ave(2, seconds=seconds, max_event=seconds)
    with torch.no_grad():
        out = forward(real_models[task], data, task)
    assert out["segment_logits"].shape == (2, seconds, 29)
    assert out["category_logits"].shape == out["visual_category_logits"].shape == (2, 28)
    assert out["spatial_attention"].shape == (2, seconds, 49) and out["channel_attention"].shape == (2, seconds, 512)
    torch.testing.assert_close(out["spatial_attention"].sum(-1), torch.ones(2, seconds))
    assert ("video_logits" in out) == (task == "weak")
    if task == "weak":
        assert out["video_logits"].shape == out["video_logits_visual"].shape == (2, 29)
        assert torch.isfinite(out["video_logits"]).all()
    pred = real_models[task].predict(out, task)
    assert pred.shape == (2, seconds) and pred.dtype == torch.long
    assert torch.equal(out["segment_logits"].argmax(-1), pred)  # the scores encode the paper's decision rule


@pytest.mark.parametrize("seconds", [10, 3])
@pytest.mark.parametrize("direction", ["a2v", "v2a"])
def test_cml_shapes_real_dims(real_models, seconds, direction):
    data = make_synthetic_ave(2, seconds=seconds, max_event=seconds - 1, seed=1)
    with torch.no_grad():
        out = forward(real_models["cml"], make_batch(data, slice(None)), "cml", direction)
    assert out["match_logits"].shape == (2, seconds) and torch.isfinite(out["match_logits"]).all()


def test_predict_rule():
    model = build_model("dmin", "supervised", SMALL)
    out = {"relevance_logits": torch.tensor([[-0.2, 0.0, 3.0]]),
           "category_logits": torch.zeros(1, 28).index_fill(1, torch.tensor([7]), 2.0)}
    assert model.predict(out, "supervised").tolist() == [[BACKGROUND, 7, 7]]  # s_t >= 0.5 -> category


# ---- equation blocks against slow references -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_fcpp_equals_weighted_outer_products(alpha):
    # Eq. 13: FCPP(q, k) = sum((q outer k) * W), W = alpha on the diagonal, (1 - alpha) / (d_k - 1) elsewhere.
    torch.manual_seed(0)
    d = 6
    q, k = torch.randn(2, 4, d, dtype=torch.float64), torch.randn(2, 5, d, dtype=torch.float64)
    w = torch.full((d, d), (1 - alpha) / (d - 1), dtype=torch.float64).fill_diagonal_(alpha)
    slow = torch.tensor([[[(torch.outer(q[b, i], k[b, j]) * w).sum() for j in range(5)] for i in range(4)]
                         for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(full_channel_pair_scores(q, k, alpha), slow)
    # alpha = 1 leaves only the diagonal: the dot product.
    torch.testing.assert_close(full_channel_pair_scores(q, k, 1.0), q @ k.transpose(1, 2))


def test_dima_attention_follows_eq_11():
    torch.manual_seed(0)
    dim, heads, alpha = 8, 2, 0.5
    att = DenseAttention(dim, heads, dropout=0.0, dense_alpha=alpha).double().eval()
    x, y = torch.randn(1, 3, dim, dtype=torch.float64), torch.randn(1, 4, dim, dtype=torch.float64)
    y_mask = torch.tensor([[True, True, False, True]])
    out, weights = att(x, x, torch.ones(1, 3, dtype=torch.bool), y, y_mask)
    q, keys = x[0] @ att.query.weight.T, torch.cat([x, y], 1)[0]
    k, v = keys @ att.key.weight.T, keys @ att.value.weight.T
    dk = dim // heads
    w = torch.full((dk, dk), (1 - alpha) / (dk - 1), dtype=torch.float64).fill_diagonal_(alpha)
    heads_out = []
    for h in range(heads):
        cols = slice(h * dk, (h + 1) * dk)
        qh, kh, vh = q[:, cols], k[:, cols], v[:, cols]
        n_x = qh @ kh[:3].T / math.sqrt(dk)  # dot product with the own modality
        n_y = torch.stack([torch.stack([(torch.outer(qh[i], kh[3 + j]) * w).sum() for j in range(4)])
                           for i in range(3)]) / math.sqrt(dk)  # DFA with the other modality
        n_y[:, 2] = -math.inf  # masked key
        probs = torch.cat([n_x, n_y], 1).softmax(-1)
        torch.testing.assert_close(weights[0, h], probs)
        heads_out.append(probs @ vh)
    torch.testing.assert_close(out[0], torch.cat(heads_out, 1) @ att.out.weight.T + att.out.bias)
    assert (weights[..., 3 + 2] == 0).all()


def test_mfb_equals_explicit_bilinear_pooling():
    # Eq. 3-4: z = SP(relu(Phi a) * relu(Psi v), k): output o sums the diagonal of the bilinear (outer) product over
    # its k factors; then signed square root and L2 normalisation.
    torch.manual_seed(0)
    da, dv, d_o, k = 5, 7, 3, 4
    mfb = MFBCorrelation(dv, da, d_o, k, dropout=0.5).double().eval()
    audio, visual = torch.randn(2, 3, da, dtype=torch.float64), torch.randn(2, 3, 6, dv, dtype=torch.float64)
    fast = mfb(audio, visual)
    for b in range(2):
        for t in range(3):
            pa = F.relu(mfb.audio.weight @ audio[b, t] + mfb.audio.bias)
            for s in range(6):
                pv = F.relu(mfb.visual.weight @ visual[b, t, s] + mfb.visual.bias)
                bilinear = torch.outer(pa, pv)
                z = torch.stack([sum(bilinear[o * k + j, o * k + j] for j in range(k)) for o in range(d_o)])
                z = torch.sign(z) * torch.sqrt(z.abs())
                torch.testing.assert_close(fast[b, t, s], z / z.norm())


def test_signed_sqrt_is_exact_with_finite_gradient_at_zero():
    x = torch.tensor([-4.0, 0.0, 9.0], requires_grad=True)
    y = signed_sqrt(x)
    assert y.tolist() == [-2.0, 0.0, 3.0]
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[1] == 0


def test_agta_maps_equal_explicit_computation():
    # Eq. 1-8 written out per second and per position, with one plain LSTM run per position.
    torch.manual_seed(0)
    da, dv, n, t = 4, 6, 9, 5
    agta = AudioGuidedTripletAttention(dv, da, bottleneck=3, out_dim=4, factor=2, mfb_dropout=0.0,
                                       lstm_layers=1).double().eval()
    visual, audio = torch.randn(2, t, 3, 3, dv, dtype=torch.float64), torch.randn(2, t, da, dtype=torch.float64)
    attended, spatial, channel = agta(visual, audio, torch.ones(2, t, dtype=torch.bool))
    ca, mfb, tmp = agta.channel, agta.mfb, agta.temporal
    v = visual.flatten(2, 3)
    for b in range(2):
        a_p = F.relu(tmp.audio(audio[b]))  # a^P, Eq. 5
        v_c = torch.stack([channel[b, i] * v[b, i] for i in range(t)])
        temporal = [tmp.lstm.lstm(torch.cat([F.relu(tmp.visual(v_c[:, s])) + a_p, a_p], -1)[None])[0][0]
                    for s in range(n)]  # Eq. 6, [t, d_o] per position
        for i in range(t):
            joint = torch.stack([F.relu(ca.audio(audio[b, i])) * F.relu(ca.visual(v[b, i, s])) for s in range(n)])
            m_c = torch.sigmoid(ca.excite(F.relu(ca.squeeze(joint.mean(0)))))  # Eq. 1
            torch.testing.assert_close(channel[b, i], m_c)
            scores = []
            for s in range(n):
                z = (F.relu(mfb.audio(audio[b, i])) * F.relu(mfb.visual(v_c[i, s]))).view(4, 2).sum(-1)
                z = torch.sign(z) * z.abs().sqrt()
                z = z / z.norm().clamp_min(1e-12)  # an all-zero product stays 0 (F.normalize's eps)
                scores.append(torch.tanh(agta.score(z + temporal[s][i])))  # Eq. 7 before the softmax
            m_s = torch.cat(scores).softmax(0)
            torch.testing.assert_close(spatial[b, i], m_s)
            torch.testing.assert_close(attended[b, i], (m_s[:, None] * v_c[i]).sum(0))  # Eq. 8


def test_sliding_weights_equal_explicit_windows():
    # Eq. 19: window k multiplies candidate second k + i by q_i; a second's weight is the mean over its windows.
    torch.manual_seed(0)
    values = torch.randn(4, 10, dtype=torch.float64)
    lengths = torch.tensor([10, 10, 7, 4])
    mask = torch.arange(10) < lengths[:, None]
    query = torch.zeros(4, 10, dtype=torch.bool)
    query[0, 2:5] = query[1, 0:10] = query[2, 5:7] = True
    query[3, [0, 2]] = True  # not contiguous: the query sequence is its seconds in time order
    fast = sliding_query_weights(values, query, mask)
    for b in range(4):
        q = values[b][query[b]]
        length, kq = int(lengths[b]), len(q)
        total, count = torch.zeros(10, dtype=torch.float64), torch.zeros(10)
        for k in range(length - kq + 1):
            for i in range(kq):
                total[k + i] += q[i]
                count[k + i] += 1
        torch.testing.assert_close(fast[b, :length], total[:length] / count[:length])
        assert (fast[b, length:] == 0).all()


def test_dcmr_scores_are_the_mean_of_per_window_scores():
    # The whole Eq. 19 path: match_logits[t] = mean over windows k covering t of FC(q_{t-k} * candidate_t).
    torch.manual_seed(0)
    model = move_layernorms(build_model("dcmr", "cml", SMALL_CML)).double().eval()
    data = small_data(3, seed=4, min_event=2, max_event=5)
    mask = data["mask"].clone()
    mask[1, 8:] = False
    query = data["event"].bool() & mask
    captured = {}
    model.interaction.register_forward_hook(lambda mod, args, out: captured.update(out=out))
    for direction in ("a2v", "v2a"):
        scores = model.forward_cml(data["visual"].double(), data["audio"].double(), mask, query, direction)
        _, _, a_cross, v_cross = captured["out"]
        q_feat, cand = (a_cross, v_cross) if direction == "a2v" else (v_cross, a_cross)
        head = model.match[direction]
        for b in range(3):
            q = q_feat[b][query[b]].mean(-1)  # channel mean of the query seconds
            length, kq = int(mask[b].sum()), len(q)
            per_second = [[] for _ in range(length)]
            for k in range(length - kq + 1):
                for i in range(kq):
                    per_second[k + i].append(head(q[i] * cand[b, k + i]))
            expected = torch.cat([torch.stack(s).mean(0) for s in per_second])
            torch.testing.assert_close(scores["match_logits"][b, :length], expected)


def test_channel_mean_query_is_zero_at_layernorm_init():
    # A fact of the paper's design (Mean over channels of a LayerNorm output): at gamma = 1, beta = 0 it vanishes.
    torch.manual_seed(0)
    model = build_model("dcmr", "cml", SMALL_CML).eval()
    data = small_data(2, seed=5, min_event=2, max_event=5)
    out = forward(model, make_batch(data, slice(None)), "cml", "a2v")
    assert out["query_weights"].abs().max() < 1e-5


def test_udl_supervised_loss_equals_hand_computation():
    model = build_model("dmin", "supervised", SMALL)
    relevance = torch.tensor([[0.3, -1.2, 2.0], [0.5, -0.4, 9.9]])
    category, visual_category = torch.randn(2, 28), torch.randn(2, 28)
    batch = {"event": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), "video_label": torch.tensor([5, BACKGROUND]),
             "mask": torch.tensor([[True, True, True], [True, True, False]])}
    out = {"relevance_logits": relevance, "category_logits": category, "visual_category_logits": visual_category}

    def sig(x):
        return 1 / (1 + math.exp(-x))

    video0 = -(math.log(sig(0.3)) + math.log(1 - sig(-1.2)) + math.log(sig(2.0))) / 3
    video1 = -(math.log(1 - sig(0.5)) + math.log(1 - sig(-0.4))) / 2  # the padded second does not count
    l_ero = (video0 + video1) / 2  # Eq. 15
    # Eq. 16 on F_o and on v_self; only the event video has a category.
    l_eco = -math.log(math.exp(category[0, 5]) / sum(math.exp(c) for c in category[0].tolist()))
    l_ecm = -math.log(math.exp(visual_category[0, 5]) / sum(math.exp(c) for c in visual_category[0].tolist()))
    expected = l_ero + 0.1 * l_ecm + 0.9 * l_eco  # Eq. 17, lambda = 0.1
    assert model.loss(out, batch, "supervised").item() == pytest.approx(expected, rel=1e-5)


def test_weak_mil_pooling_and_loss_equal_hand_computation():
    model = build_model("dmin", "weak", SMALL)
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    fused = (torch.tensor([[0.3, -1.2, 2.0], [0.5, -0.4, 9.9]]), torch.randn(2, 28))
    visual = (torch.tensor([[1.0, 0.1, -2.0], [-0.5, 0.7, 9.9]]), torch.randn(2, 28))
    labels = torch.tensor([5, BACKGROUND])

    def video_probs(relevance, category, b):
        s = [1 / (1 + math.exp(-r)) for r, m in zip(relevance[b].tolist(), mask[b].tolist()) if m]
        p = torch.softmax(category[b], 0).tolist()
        return [max(st * p[c] for st in s) for c in range(28)] + [max(1 - st for st in s)]  # MIL max pooling

    def branch_loss(relevance, category):
        per_video = []
        for b in range(2):
            probs = video_probs(relevance, category, b)
            classes = range(29) if labels[b] == BACKGROUND else range(28)  # an event video's background is unknown
            bce = [-math.log(probs[c]) if c == labels[b] else -math.log(1 - probs[c]) for c in classes]
            per_video.append(sum(bce) / len(bce))
        return sum(per_video) / 2

    for relevance, category in (fused, visual):
        logits = mil_video_logits(relevance, category, mask)
        for b in range(2):
            expected = torch.tensor(video_probs(relevance, category, b))
            torch.testing.assert_close(torch.sigmoid(logits[b]), expected, rtol=1e-5, atol=1e-7)
    out = {"video_logits": mil_video_logits(*fused, mask), "video_logits_visual": mil_video_logits(*visual, mask)}
    expected = 0.08 * branch_loss(*visual) + 0.92 * branch_loss(*fused)  # Eq. 18, lambda = 0.08
    batch = {"video_label": labels, "mask": mask}
    assert model.loss(out, batch, "weak").item() == pytest.approx(expected, rel=1e-5)


# Masks (padding, prefix-only), CML query leakage and gradient flow: tests/models/test_contract.py, for every model.


# ---- learning --------------------------------------------------------------------------------------------------------
# Synthetic AVE-like task (avepipe.data.synthetic): an event second is one where audio and visual show the video's
# class. The paper's lr (5e-5) is for the real features over 200 epochs; these few-epoch runs use Adam at 3e-3, halved
# as in the paper's schedule. Maps are 4x4 (the class sits in 2-4 of 16 cells) to keep AGTA's per-position BiLSTM cheap.


def _train_halving(model, data, task: str, epochs: tuple[int, ...], lr: float = 3e-3) -> None:
    """``epochs[i]`` epochs at ``lr / 2**i`` (the paper's "divided by 2" schedule, compressed)."""
    for i, n in enumerate(epochs):
        train(model, data, task=task, epochs=n, lr=lr / 2**i, seed=i)


def test_learns_synthetic_supervised():
    train_set, test_set = split(small_data(1800, seed=10, min_event=2, spatial=4), 1500)
    torch.manual_seed(0)
    model = build_model("dmin", "supervised", SMALL)
    _train_halving(model, train_set, "supervised", (4, 2))
    accuracy = segment_accuracy(model, test_set, "supervised")
    assert accuracy >= 0.95, accuracy


def test_learns_synthetic_weak_from_video_labels_only():
    # Many videos, few epochs: under video labels the longer a model trains on few videos, the more it marks whole
    # event videos as event (nothing in the MIL objective forbids it); 3,600 videos x 3 epochs localizes better than
    # 1,500 x 8.
    train_set, test_set = split(small_data(3900, seed=11, min_event=2, background_videos=0.3, spatial=4), 3600)
    train_set["labels"] = torch.full_like(train_set["labels"], -100)  # the weak loss must not need per-second labels
    train_set["event"] = torch.full_like(train_set["event"], float("nan"))
    torch.manual_seed(0)
    model = build_model("dmin", "weak", SMALL)
    _train_halving(model, train_set, "weak", (2, 1))
    accuracy = segment_accuracy(model, test_set, "weak")
    # Trivial baselines on this test set: all-background 0.61; the true video category on every second 0.70.
    assert accuracy >= 0.85, accuracy


def test_learns_synthetic_cml():
    # DCMR averages the map over space (Sec. VI-B), which dilutes the few cells that carry the visual class: a 4x4 map
    # with noise 0.5 keeps that task about as hard as the attention models' 7x7 map.
    train_set, test_set = split(small_data(1900, seed=20, min_event=2, max_event=9, spatial=4, noise=0.5), 1600)
    torch.manual_seed(0)
    model = build_model("dcmr", "cml", SMALL_CML)
    _train_halving(model, train_set, "cml", (3, 1))
    for direction in ("a2v", "v2a"):
        accuracy = exact_match(model, test_set, direction)
        assert accuracy >= 0.90, (direction, accuracy)


def test_parameter_count_real_dims(real_models):
    # Pinned so a change of architecture is a conscious one (the docs quote these numbers).
    assert parameter_count(real_models["supervised"]) == 10_958_394
    assert parameter_count(real_models["weak"]) == 10_958_651
    assert parameter_count(real_models["cml"]) == 8_050_690
