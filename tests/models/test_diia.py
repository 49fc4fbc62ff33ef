"""DIIA: every equation block against a slow reference written from the paper's formulas, shapes, masks, gradient flow,
learning the synthetic task, pinned parameter count."""

from __future__ import annotations

import math

import pytest
import torch

from avepipe.data.synthetic import make_synthetic_ave
from avepipe.models.diia import DIIA, NUM_CLASSES
from avepipe.models.registry import build_model, get_spec, parameter_count
from tests.models.common import (
    SMALL_CONFIGS,
    segment_accuracy,
    small_data,
    split,
    train,
)

# Small widths for the learning test (the data has Dv = 64, Da = 32).
SMALL = SMALL_CONFIGS["diia"]
# Tiny widths for the reference comparisons (slow per-element loops), in float64 so the comparison can be tight.
TINY = {"visual_dim": 6, "audio_dim": 5, "channel_hidden": 7, "channel_bottleneck": 3, "spatial_hidden": 4, "dim": 8,
        "heads": 2, "ff_dim": 12, "dropout": 0.0}


def _tiny_model(**overrides) -> DIIA:
    torch.manual_seed(0)
    return build_model("diia", "supervised", {**TINY, **overrides}).double().eval()


def _tiny_inputs(batch: int = 2, seconds: int = 4, cells: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, seconds, cells, cells, TINY["visual_dim"], generator=g, dtype=torch.float64)
    audio = torch.randn(batch, seconds, TINY["audio_dim"], generator=g, dtype=torch.float64)
    mask = torch.ones(batch, seconds, dtype=torch.bool)
    mask[1, 2:] = False  # the second video has 2 real seconds
    return visual, audio, mask


# ---- slow references, one per equation block -------------------------------------------------------------------------


def _affine(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = layer.weight @ x
    return out if layer.bias is None else out + layer.bias


def _sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_spatial_channel_attention(att, visual: torch.Tensor, audio: torch.Tensor):
    """Per second, per cell i and per channel j: channel map, (1 + M^c) gating, spatial softmax, weighted sum."""
    b_size, t_size = audio.shape[:2]
    visual = visual.flatten(2, 3)
    n_cells, dv = visual.shape[2], visual.shape[3]
    attended = torch.zeros(b_size, t_size, dv, dtype=visual.dtype)
    channel_maps = torch.zeros(b_size, t_size, dv, dtype=visual.dtype)
    alphas = torch.zeros(b_size, t_size, n_cells, dtype=visual.dtype)
    for b in range(b_size):
        for t in range(t_size):
            a, cells = audio[b, t], visual[b, t]
            guide = torch.relu(_affine(att.channel_audio, a))
            squeezed = sum(guide * torch.relu(_affine(att.channel_visual, cells[i])) for i in range(n_cells)) / n_cells
            hidden = torch.relu(_affine(att.channel_squeeze, squeezed))
            w2, b2 = att.channel_excite.weight, att.channel_excite.bias
            channel_map = torch.stack([_sigmoid(w2[j] @ hidden + b2[j]) for j in range(dv)])
            gated = [(1 + channel_map) * cells[i] for i in range(n_cells)]
            audio_s = torch.relu(_affine(att.spatial_audio, a))
            scores = torch.stack([
                torch.tanh(_affine(att.spatial_score, torch.relu(_affine(att.spatial_visual, gated[i])) * audio_s))[0]
                for i in range(n_cells)
            ])
            alpha = torch.exp(scores) / torch.exp(scores).sum()
            attended[b, t] = sum(alpha[i] * gated[i] for i in range(n_cells))
            channel_maps[b, t], alphas[b, t] = channel_map, alpha
    return attended, channel_maps, alphas


def ref_conditional_gate(gate, target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1 + sigma(Avg_pool(source) W)) * target, Avg_pool over each video's real seconds (Eq. 5-8)."""
    out = torch.empty_like(target)
    for b in range(target.shape[0]):
        real = [t for t in range(target.shape[1]) if mask[b, t]]
        pooled = sum(source[b, t] for t in real) / len(real)
        g = _sigmoid(gate.weight.weight @ pooled)
        for t in range(target.shape[1]):
            out[b, t] = (1 + g) * target[b, t]
    return out


def ref_attention_block(block, query, key, value, key_mask, residual=None):
    """FFN(MHA(query; key; value)) with explicit per-head softmax(Q W_Q (K W_K)^T / sqrt(d_k)) V W_V over the real keys
    only, W_O, residual + LayerNorm, ReLU FFN (Eq. 1-2). Returns (output, weights with zeros on padded keys)."""
    mha = block.attention
    b_size, n_query, d = query.shape
    n_key, heads = key.shape[1], mha.heads
    dk = d // heads
    residual = query if residual is None else residual
    out = torch.zeros_like(query)
    weights = torch.zeros(b_size, heads, n_query, n_key, dtype=query.dtype)
    for b in range(b_size):
        real = [m for m in range(n_key) if key_mask[b, m]]
        for qi in range(n_query):
            head_outputs = []
            for h in range(heads):
                rows = slice(h * dk, (h + 1) * dk)
                q = mha.query.weight[rows] @ query[b, qi]
                scores = torch.stack([q @ (mha.key.weight[rows] @ key[b, m]) / math.sqrt(dk) for m in real])
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                weights[b, h, qi, real] = w
                head_outputs.append(sum(w[j] * (mha.value.weight[rows] @ value[b, m]) for j, m in enumerate(real)))
            attended = mha.out.weight @ torch.cat(head_outputs)
            x = _layer_norm(block.norm_attention, residual[b, qi] + attended)
            ffn = _affine(block.ffn[2], torch.relu(_affine(block.ffn[0], x)))
            out[b, qi] = _layer_norm(block.norm_ffn, x + ffn)
    return out, weights


def ref_head(model, visual_inter, audio_inter):
    """F_va = (V_inter W^v + A_inter W^a) / 2 (Eq. 11), then FC -> ReLU -> FC, per second."""
    logits = torch.zeros(visual_inter.shape[:2] + (NUM_CLASSES,), dtype=visual_inter.dtype)
    for b in range(visual_inter.shape[0]):
        for t in range(visual_inter.shape[1]):
            v, a = visual_inter[b, t], audio_inter[b, t]
            fused = 0.5 * (_affine(model.fuse_visual, v) + _affine(model.fuse_audio, a))
            logits[b, t] = _affine(model.classifier[2], torch.relu(_affine(model.classifier[0], fused)))
    return logits


def ref_forward(model, visual, audio, mask):
    """The whole model composed from the references above, following the paper's data flow."""
    keep = mask[..., None]
    visual = torch.where(keep[..., None, None], visual, 0.0)
    audio = torch.where(keep, audio, 0.0)
    attended, _, _ = ref_spatial_channel_attention(model.attention, visual, audio)
    v = torch.stack([torch.stack([_affine(model.visual_embed, x) for x in row]) for row in attended])
    a = torch.stack([torch.stack([_affine(model.audio_embed, x) for x in row]) for row in audio])
    for block in model.blocks:
        v_hat = ref_conditional_gate(block.gate_from_audio, v, a, mask)  # Eq. 5: V gated by G_A
        a_hat = ref_conditional_gate(block.gate_from_visual, a, v, mask)  # Eq. 6: A gated by G_V
        v_intra, _ = ref_attention_block(block.visual_intra, v_hat, v_hat, v, mask, residual=v)  # Eq. 3
        a_intra, _ = ref_attention_block(block.audio_intra, a_hat, a_hat, a, mask, residual=a)  # Eq. 4
        v, _ = ref_attention_block(block.visual_inter, v_intra, a_intra, a_intra, mask)  # Eq. 9
        a, _ = ref_attention_block(block.audio_inter, a_intra, v_intra, v_intra, mask)  # Eq. 10
    return ref_head(model, v, a)


# ---- each block against its reference --------------------------------------------------------------------------------


def test_spatial_channel_attention_matches_reference():
    model = _tiny_model()
    visual, audio, _ = _tiny_inputs()
    attended, channel_map, alpha = model.attention(visual, audio)
    ref = ref_spatial_channel_attention(model.attention, visual, audio)
    for got, want in zip((attended, channel_map, alpha), ref):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(alpha.shape[:2], dtype=alpha.dtype))
    assert ((channel_map > 0) & (channel_map < 1)).all()


def test_conditional_gate_matches_reference():
    model = _tiny_model()
    gate = model.blocks[0].gate_from_audio
    g = torch.Generator().manual_seed(2)
    target = torch.randn(2, 4, TINY["dim"], generator=g, dtype=torch.float64)
    source = torch.randn(2, 4, TINY["dim"], generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    ref = ref_conditional_gate(gate, target, source, mask)
    torch.testing.assert_close(gate(target, source, mask), ref)
    # Avg_pool runs over real seconds only: padded source seconds do not move the gate.
    source[1, 2:] = 1e3
    torch.testing.assert_close(gate(target, source, mask), ref)


@pytest.mark.parametrize("kind", ["intra", "inter"])
def test_attention_block_matches_reference(kind):
    model = _tiny_model()
    block = model.blocks[0].visual_intra if kind == "intra" else model.blocks[0].visual_inter
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(2, 5, TINY["dim"], generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    if kind == "intra":  # gated queries / keys, original values and skip connection (Eq. 3)
        x_hat = 1.5 * x
        args, residual = (x_hat, x_hat, x), x
    else:  # queries from one modality, keys / values from the other (Eq. 9)
        args, residual = (x, y, y), None
    out, weights = block(*args, mask, residual=residual)
    ref_out, ref_weights = ref_attention_block(block, *args, mask, residual=residual)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)
    assert (weights[1, ..., 3:] == 0).all()  # padded keys get no attention at all


def test_fusion_head_loss_and_predict_match_reference():
    model = _tiny_model()
    g = torch.Generator().manual_seed(4)
    v, a = (torch.randn(2, 4, TINY["dim"], generator=g, dtype=torch.float64) for _ in range(2))
    logits = model.classify(v, a)
    torch.testing.assert_close(logits, ref_head(model, v, a))
    # Eq. 12 (without its constant 1/C): -mean over real seconds of log softmax at the label.
    labels = torch.randint(NUM_CLASSES, (2, 4), generator=g)
    mask = torch.tensor([[True] * 4, [True, False, False, False]])
    log_prob = torch.log(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True))
    picked = [-log_prob[b, t, labels[b, t]] for b in range(2) for t in range(4) if mask[b, t]]
    ref_loss = sum(picked) / len(picked)
    out = {"segment_logits": logits}
    torch.testing.assert_close(model.loss(out, {"labels": labels, "mask": mask}, "supervised"), ref_loss)
    assert torch.equal(model.predict(out, "supervised"), logits.argmax(-1))


@pytest.mark.parametrize("blocks", [1, 2])
def test_forward_matches_reference_composition(blocks):
    # Wiring: gates come from the *other* modality, values are un-gated, Eq. 9-10 read the intra outputs.
    model = _tiny_model(blocks=blocks)
    visual, audio, mask = _tiny_inputs()
    out = model(visual, audio, mask)["segment_logits"]
    torch.testing.assert_close(out[mask], ref_forward(model, visual, audio, mask)[mask])


# ---- registry and shapes ---------------------------------------------------------------------------------------------


def test_registered_with_paper_defaults():
    spec = get_spec("diia")
    assert spec.cls is DIIA and spec.tasks == ("supervised",)
    model_cfg, train_cfg = spec.default_config["model"], spec.default_config["train"]
    assert (model_cfg["visual_dim"], model_cfg["audio_dim"]) == (512, 128)
    assert (train_cfg["optimizer"], train_cfg["lr"], train_cfg["batch_size"]) == ("adam", 7e-4, 128)
    assert (train_cfg["lr_milestones"], train_cfg["lr_gamma"]) == ([10, 20, 30], 0.5)
    assert train_cfg["epochs"] > 30
    for task in ("weak", "cml"):
        with pytest.raises(ValueError):
            build_model("diia", task)
        with pytest.raises(ValueError):
            DIIA(task, **TINY)
    with pytest.raises(ValueError):
        build_model("diia", "supervised", {"blocks": 0})
    with pytest.raises(ValueError):
        build_model("diia", "supervised", {"dim": 256, "heads": 3})


@pytest.mark.parametrize("seconds", [10, 3])
def test_shapes_real_dims(seconds):
    torch.manual_seed(0)
    model = build_model("diia", "supervised").eval()
    data = make_synthetic_ave(2, seconds=seconds, max_event=seconds)
    out = model(data["visual"], data["audio"], data["mask"])
    assert out["segment_logits"].shape == (2, seconds, NUM_CLASSES)
    assert torch.isfinite(out["segment_logits"]).all()
    pred = model.predict(out, "supervised")
    assert pred.shape == (2, seconds) and pred.dtype == torch.long


def test_parameter_count_real_dims():
    # Pinned so a change of architecture is a conscious one (the docs quote these numbers).
    model = build_model("diia", "supervised")
    assert parameter_count(model.attention) == 756_225
    assert parameter_count(model.blocks) == 3_286_016
    assert parameter_count(model) == 4_411_422


# ---- masks (the contract's padding, prefix and gradient checks: tests/models/test_contract.py) -----------------------


def test_no_attention_lands_on_a_padded_second():
    torch.manual_seed(0)
    model = build_model("diia", "supervised", SMALL).eval()
    data = small_data(3, seed=5)
    mask = data["mask"].clone()
    mask[0, 6:] = False
    mask[2, 3:] = False
    visual, audio = data["visual"].clone(), data["audio"].clone()
    visual[~mask] = float("nan")
    audio[~mask] = float("inf")
    # Intra or inter, either modality: every attention weight on a padded second is exactly 0.
    _, _, weights = model.encode(visual, audio, mask)
    for name, w in weights[0].items():
        assert (w.masked_select(~mask[:, None, None, :]) == 0).all(), name


# ---- learning --------------------------------------------------------------------------------------------------------


def test_learns_synthetic_supervised():
    # 1,000 training videos: with 400, DIIA fits its training set (98%) but stops at ~91% held out.
    data = small_data(1300, seed=10, min_event=2)
    train_data, test_data = split(data, 1000)
    torch.manual_seed(0)
    model = build_model("diia", "supervised", SMALL)
    train(model, train_data, task="supervised", epochs=5, lr=2e-3)
    accuracy = segment_accuracy(model, test_data, "supervised")
    assert accuracy >= 0.95, accuracy
