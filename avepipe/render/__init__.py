"""Rich rendering for the CLI (progress bars, tables). No pipeline logic here.

Three modules by what they show; every public name is re-exported here (the same objects):

- :mod:`avepipe.render.progress`: live progress while a command runs (``--progress`` modes, extract / decode /
  localize / train displays) and the formatters :func:`clock` and :func:`plural`;
- :mod:`avepipe.render.summaries`: what a finished run prints (summary tables, cache listings, localize's labels);
- :mod:`avepipe.render.downloads`: the ``weights`` and ``dataset`` commands (download bars, outcomes, listings).
"""

from avepipe.render.downloads import (
    DownloadProgress,
    render_dataset_outcomes,
    render_unreachable,
    render_weights_list,
    render_weights_outcomes,
    render_weights_verify,
    weights_list_records,
)
from avepipe.render.progress import (
    DEFAULT_LOG_INTERVAL_S,
    LONG_VIDEO_S,
    PROGRESS_MODES,
    ExtractProgress,
    LocalizeProgress,
    TrainProgress,
    clock,
    log_interval,
    plural,
    progress_mode,
)
from avepipe.render.summaries import (
    localize_table,
    render_cache,
    render_device_results,
    render_extract_report,
    render_localize,
    render_train_summary,
)

__all__ = [
    "DEFAULT_LOG_INTERVAL_S", "LONG_VIDEO_S", "PROGRESS_MODES",
    "DownloadProgress", "ExtractProgress", "LocalizeProgress", "TrainProgress",
    "clock", "localize_table", "log_interval", "plural", "progress_mode", "render_cache", "render_dataset_outcomes",
    "render_device_results", "render_extract_report", "render_localize", "render_train_summary", "render_unreachable",
    "render_weights_list", "render_weights_outcomes", "render_weights_verify", "weights_list_records",
]
