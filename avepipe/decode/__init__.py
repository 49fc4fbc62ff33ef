"""Per-video decoding: one pass over a file gives the selected 224x224 frames of every second and the log-mel examples.

Two modules; every public name is re-exported here (the same objects):

- :mod:`avepipe.decode.video`: the contract of one video (:func:`decode_video`, :func:`decode_file`): index, plan the
  AVE sampling, one ffmpeg pass, the messages (:class:`Started`, :class:`Second`, :class:`Finished`, :class:`Failed`);
- :mod:`avepipe.decode.workers`: many videos in decode processes (:class:`DecodeSource`), the shared-memory ring their
  frames travel in, and the process plumbing shared with the multi-device runner.
"""

from avepipe.decode.video import (
    FRAME_SHAPE,
    SECOND_BYTES,
    Failed,
    Finished,
    Message,
    Second,
    SecondFiller,
    SlotSource,
    Started,
    VideoTask,
    decode_file,
    decode_video,
    fresh_slot,
    plan_frames,
)
from avepipe.decode.workers import (
    RING_SLOTS,
    SHM_RESERVE,
    DecodeSource,
    FrameRing,
    exit_with_parent,
    ring_slots,
    shared_memory_free,
    start_processes,
)

__all__ = [
    "FRAME_SHAPE", "RING_SLOTS", "SECOND_BYTES", "SHM_RESERVE",
    "DecodeSource", "Failed", "Finished", "FrameRing", "Message", "Second", "SecondFiller", "SlotSource", "Started",
    "VideoTask", "decode_file", "decode_video", "exit_with_parent", "fresh_slot", "plan_frames", "ring_slots",
    "shared_memory_free", "start_processes",
]
