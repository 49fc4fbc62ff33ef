"""AVE-like synthetic localization task with known answers, for tests and benchmarks.

Each of the ``num_classes - 1`` event classes has a fixed audio prototype and a fixed visual prototype (drawn from
``seed``). A video has a category ``c`` and one contiguous event span. Per second:

* event second: audio = proto_a[c] + noise; the visual map is noise everywhere plus proto_v[c] at 2-4 random cells;
* background second: same recipe, but audio shows a random class ``a`` and the visual map a different random class
  ``b != a``. Either may equal ``c``, so neither modality alone tells event from background: only agreement does.

A ``background_videos`` fraction of videos has no event at all (video_label = background); weakly supervised models
need them to learn what background looks like.

Prototypes and samples both come from ``seed``: to get held-out data *of the same task*, generate once and split
(e.g. the first 400 videos for training, the rest for testing), never call again with another seed.
"""

from __future__ import annotations

import torch

_CELLS_MIN, _CELLS_MAX = 2, 4  # cells per second that carry the visual prototype ("a few" of the 7x7 map)


def make_synthetic_ave(
    n_videos: int,
    *,
    seconds: int = 10,
    num_classes: int = 29,
    visual_dim: int = 512,
    audio_dim: int = 128,
    spatial: int = 7,
    seed: int = 0,
    noise: float = 1.0,
    min_event: int = 1,
    max_event: int = 10,
    background_videos: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Return visual [N,T,S,S,Dv], audio [N,T,Da], labels [N,T], event [N,T], video_label [N], mask [N,T]."""
    if n_videos < 1 or seconds < 1 or spatial < 1:
        raise ValueError("n_videos, seconds and spatial must be positive")
    if num_classes < 3:
        raise ValueError("num_classes must be >= 3 (two event classes are needed to mismatch the background)")
    if not 1 <= min_event <= max_event:
        raise ValueError(f"need 1 <= min_event <= max_event, got {min_event}, {max_event}")
    if not 0.0 <= background_videos <= 1.0:
        raise ValueError(f"background_videos is a fraction in [0, 1], got {background_videos}")
    g = torch.Generator().manual_seed(seed)
    n_events, background = num_classes - 1, num_classes - 1
    cells = spatial * spatial
    proto_a = torch.randn(n_events, audio_dim, generator=g)
    proto_v = torch.randn(n_events, visual_dim, generator=g)

    category = torch.randint(n_events, (n_videos,), generator=g)
    no_event = torch.rand(n_videos, generator=g) < background_videos
    longest, shortest = min(max_event, seconds), min(min_event, seconds)
    length = torch.randint(shortest, longest + 1, (n_videos,), generator=g)
    start = (torch.rand(n_videos, generator=g) * (seconds - length + 1)).long()
    t = torch.arange(seconds)
    event = (t >= start[:, None]) & (t < (start + length)[:, None]) & ~no_event[:, None]

    # Background seconds: audio class a, visual class b = a + offset (mod n_events) with offset != 0.
    audio_bg = torch.randint(n_events, (n_videos, seconds), generator=g)
    visual_bg = (audio_bg + torch.randint(1, n_events, (n_videos, seconds), generator=g)) % n_events
    audio_class = torch.where(event, category[:, None], audio_bg)
    visual_class = torch.where(event, category[:, None], visual_bg)

    audio = proto_a[audio_class] + noise * torch.randn(n_videos, seconds, audio_dim, generator=g)
    visual = noise * torch.randn(n_videos, seconds, cells, visual_dim, generator=g)
    # Choose k random cells per second: rank a random score per cell and keep the k lowest ranks.
    k = torch.randint(_CELLS_MIN, _CELLS_MAX + 1, (n_videos, seconds, 1), generator=g).clamp(max=cells)
    ranks = torch.rand(n_videos, seconds, cells, generator=g).argsort(-1).argsort(-1)
    carries = (ranks < k).unsqueeze(-1)
    visual = visual + carries * proto_v[visual_class].unsqueeze(2)

    labels = torch.where(event, category[:, None], torch.full_like(audio_class, background))
    return {
        "visual": visual.reshape(n_videos, seconds, spatial, spatial, visual_dim).float(),
        "audio": audio.float(),
        "labels": labels.long(),
        "event": event.float(),
        "video_label": torch.where(no_event, torch.full_like(category, background), category).long(),
        "mask": torch.ones(n_videos, seconds, dtype=torch.bool),
    }
