"""Parity of ``--preset released`` with the authors' released code: the same random weights and inputs, eval mode.

    python bench/released_parity.py --avel DIR --psp DIR --cmbs DIR --dmin DIR [--batch 3] [--seed 0] [--float32]

Each DIR is a checkout of the released repository (YapengTian/AVE-ECCV18, jasongief/PSP_CVPR_2021, marmot-xy/CMBS,
weizequan/DMIN); give any subset. Nothing of it is copied into avepipe: the script imports the released modules from
that folder (their ``.cuda()`` calls are made no-ops, so it runs on the CPU), builds the released network and avepipe's
``released`` preset, fills the released network with random weights (every parameter, biases and LayerNorm affines
included), copies them into avepipe's through a name map, runs both on the same random features in float64 and prints
the largest |difference| of every output, the parameter counts (avepipe's, the released network's, and the released
parameters the forward never reads, which the map leaves out) and the released commit when DIR is a git checkout.
Exits 1 when an output differs by more than --tolerance (1e-5) or a parameter is left unmapped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avepipe.models.registry import build_model, parameter_count, preset_overrides  # noqa: E402

T = 10  # the released models hard-code 10 seconds


# ---- importing the released code ------------------------------------------------------------------------------------


def cpu_only() -> None:
    """The released code calls ``.cuda()`` on modules and on fresh tensors (LSTM states, the PSP scale): no-ops here;
    float64 is the default dtype, so those fresh tensors match the float64 networks."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.set_default_dtype(torch.float64)


@contextlib.contextmanager
def released_imports(root: Path):
    """Import from ``root``; the released packages (``model``, ``_VF``, ...) are dropped from ``sys.modules``
    afterwards, since two repositories both call theirs ``model``."""
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in set(sys.modules) - before:
            if not name.startswith(("avepipe", "torch", "numpy")):
                del sys.modules[name]


def load(root: Path, module: str):
    return importlib.import_module(module)


def commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


# ---- weights --------------------------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random at a scale that keeps activations moderate: weights ~ N(0, 1/fan_in), vectors
    ~ N(0, 0.1^2), LayerNorm weights ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight") and ("norm" in name.lower()):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


Rule = tuple[str, str]  # (avepipe prefix, released prefix)


def transfer(ours: torch.nn.Module, theirs: torch.nn.Module, rules: list[Rule],
             special: dict[str, Callable[[dict], torch.Tensor]] | None = None) -> set[str]:
    """Copy each of avepipe's parameters from the released one named by the first matching prefix rule (or a
    ``special`` function of the released state). Returns the released parameter names that were not read."""
    state = dict(theirs.named_parameters())
    used: set[str] = set()
    special = special or {}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name in special:
                value, names = special[name](state)
                used.update(names)
            else:
                for mine, released in rules:
                    if name.startswith(mine):
                        source = released + name[len(mine):]
                        break
                else:
                    raise SystemExit(f"no rule maps avepipe parameter {name}")
                if source not in state:
                    raise SystemExit(f"{name} -> {source}: no such released parameter")
                value, names = state[source], [source]
                used.update(names)
            if value.shape != p.shape:
                raise SystemExit(f"{name}: shape {tuple(p.shape)} vs released {tuple(value.shape)}")
            p.copy_(value)
    return set(state) - used


def in_proj(prefix: str, part: int, kind: str):
    """The ``part``-th third (0 query, 1 key, 2 value) of a released ``in_proj_weight`` / ``in_proj_bias``."""
    def get(state):
        full = state[f"{prefix}.in_proj_{kind}"]
        n = full.shape[0] // 3
        return full[part * n:(part + 1) * n], [f"{prefix}.in_proj_{kind}"]
    return get


def count(params: dict, names: set[str]) -> int:
    return sum(params[n].numel() for n in names)


# ---- the four models ------------------------------------------------------------------------------------------------


def inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    visual = torch.relu(torch.randn(batch, T, 7, 7, 512, generator=g, dtype=torch.float64))
    audio = torch.randn(batch, T, 128, generator=g, dtype=torch.float64)
    return visual, audio, torch.ones(batch, T, dtype=torch.bool)


def ours(name: str, task: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, task, preset_overrides(name, "released", task).get("model", {})).double().eval()


AVGA_RULES = [("attention.embed_visual", "affine_video"), ("attention.embed_audio", "affine_audio"),
              ("attention.project_visual", "affine_v"), ("attention.project_audio", "affine_g"),
              ("attention.score", "affine_h")]


def avel(root: Path, task: str, batch: int, seed: int):
    with released_imports(root):
        released = load(root, "models" if task == "supervised" else "models_weakly").att_Net(128, 128, 512, 29)
    released = released.double().eval()
    randomize(released, seed)
    model = ours("avel", task, seed)
    rules = [*AVGA_RULES, ("audio_lstm.lstm.", "lstm_audio."), ("visual_lstm.lstm.", "lstm_video."),
             ("head.1.", "L1."), ("head.3.", "L2.")]
    unused = transfer(model, released, rules)
    visual, audio, mask = inputs(batch, seed)
    with torch.no_grad():
        out = model(visual, audio, mask)
        if task == "supervised":
            probs = released(audio, visual)
            pairs = {"softmax(segment_logits)": (out["segment_logits"].softmax(-1), probs),
                     "predict (argmax, supervised_main.py compute_acc)": (model.predict(out, task), probs.argmax(-1))}
        else:
            probs, score = released(audio, visual)
            pairs = {"segment_logits": (out["segment_logits"], score),
                     "softmax(video_logits)": (out["video_logits"].softmax(-1), probs),
                     "predict (argmax, weak_supervised_main.py val)": (model.predict(out, task), score.argmax(-1))}
    return model, released, unused, pairs


def psp(root: Path, task: str, batch: int, seed: int):
    with released_imports(root):
        module = load(root, "fully_model" if task == "supervised" else "weakly_model")
        released = module.psp_net(128, 512, 128, 29).double().eval()
    randomize(released, seed)
    model = ours("psp", task, seed)
    rules = [*[(a, "attention." + b) for a, b in AVGA_RULES],
             ("audio_lstm.lstm.", "lstm_a_v.lstm_audio."), ("visual_lstm.lstm.", "lstm_a_v.lstm_video."),
             ("psp.v_key.", "psp.v_L1."), ("psp.v_query.", "psp.v_L2."), ("psp.a_query.", "psp.a_L1."),
             ("psp.a_value.", "psp.a_L2."), ("psp.v_fc.", "psp.v_fc."), ("psp.a_fc.", "psp.a_fc."),
             ("psp.norm.", "psp.layer_norm."), ("classifier.0.", "L1."), ("classifier.2.", "L2."),
             ("embed_audio.", "fa."), ("embed_visual.", "fv." if task == "supervised" else "linear_v."),
             ("weighting.", "W3.")]
    unused = transfer(model, released, rules)
    visual, audio, mask = inputs(batch, seed)
    threshold = model.threshold
    with torch.no_grad():
        out = model(visual, audio, mask)
        if task == "supervised":
            _, logits, cosine = released(audio.clone(), visual.clone(), threshold)
            pairs = {"segment_logits": (out["segment_logits"], logits), "avps (cosine)": (out["avps"], cosine),
                     "predict (argmax, measure.py compute_acc)": (model.predict(out, task), logits.argmax(-1))}
        else:
            probs, score = released(audio.clone(), visual.clone(), threshold)
            pairs = {"segment_logits": (out["segment_logits"], score),
                     "softmax(video_logits)": (out["video_logits"].softmax(-1), probs),
                     "predict (argmax, measure.py compute_acc)": (model.predict(out, task), score.argmax(-1))}
    return model, released, unused, pairs


CMBS_ATTENTION = [("query", "video_query"), ("key", "video_key"), ("value", "video_value"), ("norm", "norm"),
                  ("global_embed", "affine_video_ave"), ("cell_embed", "affine_video_3"), ("global_score", "ave_v_att"),
                  ("channel_audio", "affine_audio_1"), ("channel_visual", "affine_video_1"),
                  ("channel_bottleneck", "affine_bottleneck"), ("channel_out", "affine_v_c_att"),
                  ("spatial_visual", "affine_video_2"), ("spatial_audio", "affine_audio_2"),
                  ("spatial_score", "affine_v_s_att")]


def cmbs(root: Path, task: str, batch: int, seed: int):
    import json

    config = json.loads((root / "configs" / ("main.json" if task == "supervised" else "weak.json")).read_text())
    with released_imports(root):
        module = load(root, "model.main_model")
        cls = module.supv_main_model if task == "supervised" else module.weak_main_model
        released = cls(config["model"]).double().eval()
    randomize(released, seed)
    model = ours("cmbs", task, seed)
    rules = [(f"attention.{a}.", f"spatial_channel_att.{b}.") for a, b in CMBS_ATTENTION]
    rules += [("visual_fc.", "v_fc."), ("audio_cas.", "audio_cas."), ("visual_cas.", "video_cas."),
              ("av_interaction.attn.", "AVInter.video_multihead."), ("av_interaction.norm.", "AVInter.norm1."),
              ("va_interaction.attn.", "VAInter.video_multihead."), ("va_interaction.norm.", "VAInter.norm1."),
              ("audio_lstm.lstm.", "audio_visual_rnn_layer.audio_rnn."),
              ("visual_lstm.lstm.", "audio_visual_rnn_layer.visual_rnn."),
              ("event_head.", "localize_module.classifier."),
              ("category_head.", "localize_module.event_classifier.")]
    if task == "weak":  # weak_main_model: audio_gated reads the visual encoder, video_gated the audio encoder
        rules += [("visual_gate.", "audio_gated.0."), ("audio_gate.", "video_gated.0.")]
    else:
        rules += [("audio_gate.", "audio_gated.0."), ("visual_gate.", "video_gated.0.")]
    for mine, theirs in (("visual", "video"), ("audio", "audio")):
        rules += [(f"{mine}_encoder.project.", f"{theirs}_encoder.affine_matrix."),
                  (f"{mine}_decoder.project.", f"{theirs}_decoder.affine_matrix.")]
        for i in range(2):
            layer = f"{theirs}_encoder.encoder.layers.{i}."
            rules += [(f"{mine}_encoder.layers.{i}.attn.", layer + "self_attn."),
                      (f"{mine}_encoder.layers.{i}.ff.0.", layer + "linear1."),
                      (f"{mine}_encoder.layers.{i}.ff.3.", layer + "linear2."),
                      (f"{mine}_encoder.layers.{i}.norm", layer + "norm")]
        layer = f"{theirs}_decoder.decoder.layers.0."
        rules += [(f"{mine}_decoder.attn.", layer + "multihead_attn."), (f"{mine}_decoder.ff.0.", layer + "linear1."),
                  (f"{mine}_decoder.ff.3.", layer + "linear2."), (f"{mine}_decoder.norm", layer + "norm")]
    special = {"cas_head.weight": lambda s: (s["CAS_model.classifier.0.weight"][..., 0],
                                             ["CAS_model.classifier.0.weight"])}
    unused = transfer(model, released, rules, special)
    visual, audio, mask = inputs(batch, seed)
    with torch.no_grad():
        out = model(visual, audio, mask)
        if task == "supervised":
            is_event, category, gate, av_score = released(visual.clone(), audio.clone())
            is_event = is_event.squeeze(-1).transpose(0, 1)
            pairs = {"event_logits": (out["event_logits"], is_event),
                     "category_logits": (out["category_logits"], category),
                     "av_gate": (out["av_gate"], gate.squeeze(-1).transpose(0, 1)),
                     "av_score": (out["av_score"], av_score),
                     "predict (supv_main.py rule)": (model.predict(out, task), released_rule(is_event, category))}
        else:
            av_gate, raw, probs = released(visual.clone(), audio.clone())
            pairs = {"av_gate": (out["av_gate"], av_gate), "video_scores": (out["video_scores"], raw),
                     "softmax(video_logits)": (out["video_logits"].softmax(-1), probs),
                     "predict (weakly_main.py rule)": (model.predict(out, task), released_rule(av_gate, raw))}
    return model, released, unused, pairs


def released_rule(is_event: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``compute_accuracy_supervised(is_event_scores, event_scores, labels)`` of the CMBS and DMIN scripts, written out:
    a second is the argmax of the video's ``event_scores`` where ``sigmoid(is_event_scores) > 0.5``, else 28."""
    video_class = scores.argmax(-1)[:, None].expand_as(is_event)
    return torch.where(torch.sigmoid(is_event) > 0.5, video_class, torch.full_like(video_class, 28))


def dmin(root: Path, task: str, batch: int, seed: int):
    with released_imports(root / "DIMN"):
        if task == "supervised":
            released = load(root, "model.supv_main_model").supv_main_model()
        else:
            released = load(root, "model.weakly_main_model").weak_main_model()
    released = released.double().eval()
    randomize(released, seed)
    model = ours("dmin", task, seed)
    att = "spatial_channel_att."
    rules = [("input_fc.0.", "v_fc."), ("agta.channel.audio.", att + "affine_audio_1."),
             ("agta.channel.visual.", att + "affine_video_1."), ("agta.channel.squeeze.", att + "affine_bottleneck."),
             ("agta.channel.excite.", att + "affine_v_c_att."), ("agta.mfb.audio.", att + "affine_audio_2."),
             ("agta.mfb.visual.", att + "affine_video_2."), ("agta.temporal.audio.", att + "Linear_audio."),
             ("agta.temporal.visual.", att + "Linear_visual."), ("agta.temporal.lstm.lstm.", att + "lstm."),
             ("agta.score.", att + "affine_v_s_att."), ("fusion.attention.out.", "AVInter.video_multihead.out_proj."),
             ("fusion.norm1.", "AVInter.norm1."), ("relevance.", "localize_module.classifier."),
             ("category.", "localize_module.event_classifier."), ("visual_category.", "localize_module.event_self."),
             ("visual_relevance.", "localize_module.classifier_self.")]
    special = {}
    blocks = {"fusion.attention": "AVInter.video_multihead"}
    for mine, theirs in (("audio", "audio"), ("visual", "video")):
        rules += [(f"interaction.{mine}_proj.", f"{theirs}_encoder.affine_matrix."),
                  (f"interaction.{mine}_dima_proj.", f"{theirs}_decoder.affine_matrix.")]
        layers = {f"interaction.{mine}_encoder.layers.{i}.": f"{theirs}_encoder.encoder.layers.{i}." for i in range(2)}
        layers[f"interaction.{mine}_dima."] = f"{theirs}_decoder.decoder.layers.0."
        for ours_prefix, layer in layers.items():
            attn = layer + ("multihead_attn" if "dima" in ours_prefix else "self_attn")
            rules += [(ours_prefix + "attention.out.", attn + ".out_proj."),
                      (ours_prefix + "ff.0.", layer + "linear1."), (ours_prefix + "ff.3.", layer + "linear2."),
                      (ours_prefix + "norm", layer + "norm")]
            blocks[ours_prefix + "attention"] = attn
    for ours_prefix, attn in blocks.items():
        for part, proj in enumerate(("query", "key", "value")):
            for kind in ("weight", "bias"):
                special[f"{ours_prefix}.{proj}.{kind}"] = in_proj(attn, part, kind)
    unused = transfer(model, released, rules, special)
    visual, audio, mask = inputs(batch, seed)
    with torch.no_grad():
        out = model(visual, audio, mask)
        if task == "supervised":
            relevance, category, visual_category = released(visual.clone(), audio.clone())
            relevance = relevance.squeeze(-1).transpose(0, 1)
            pairs = {"relevance_logits": (out["relevance_logits"], relevance),
                     "category_logits": (out["category_logits"], category),
                     "visual_category_logits": (out["visual_category_logits"], visual_category),
                     "predict (supv_main.py rule)": (model.predict(out, task), released_rule(relevance, category))}
        else:
            relevance, raw, probs, probs_self = released(visual.clone(), audio.clone())
            pairs = {"relevance_logits": (out["relevance_logits"], relevance),
                     "category_logits": (out["category_logits"], raw),
                     "softmax(video_logits)": (out["video_logits"].softmax(-1), probs),
                     "softmax(video_logits_visual)": (out["video_logits_visual"].softmax(-1), probs_self),
                     "predict (weakly_main.py rule)": (model.predict(out, task), released_rule(relevance, raw))}
    return model, released, unused, pairs


MODELS = {"avel": avel, "dmin": dmin, "psp": psp, "cmbs": cmbs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in MODELS:
        parser.add_argument(f"--{name}", type=Path, help=f"the released repository of {name}")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu_only()
    failed = False
    print("| model | task | output | max abs diff |")
    print("|---|---|---|---|")
    counts = []
    for name, run in MODELS.items():
        root = getattr(args, name)
        if root is None:
            continue
        for task in ("supervised", "weak"):
            model, released, unused, pairs = run(root, task, args.batch, args.seed)
            for output, (a, b) in pairs.items():
                diff = (a.double() - b.double()).abs().max().item()
                failed |= not diff <= args.tolerance
                print(f"| {name} | {task} | {output} | {diff:.1e} |")
            params = dict(released.named_parameters())
            total = parameter_count(released)
            counts.append((name, task, parameter_count(model), total - count(params, unused), total, sorted(unused),
                           commit(root)))
    print()
    print("| model | task | avepipe parameters | released, used | released, all | released commit |")
    print("|---|---|---|---|---|---|")
    for name, task, mine, used, total, _, sha in counts:
        failed |= mine != used
        print(f"| {name} | {task} | {mine:,} | {used:,} | {total:,} | {sha[:7]} |")
    print()
    for name, task, _, _, _, unused, _ in counts:
        groups = sorted({n.rsplit(".", 1)[0] for n in unused})
        print(f"{name} {task}: released parameters the forward never reads: {', '.join(groups) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
