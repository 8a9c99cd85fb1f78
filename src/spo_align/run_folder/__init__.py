"""A run's output folder (`output.dir`): everything spo-align writes there, and the one entry point to it.

Other packages import from here, never from the modules below: what a run starts and ends with (`claim`,
`complete`), the test of a finished run (`finished_at`), the file names, sealed checkpoints, the metrics file's
reader, run.json, the folder's lock (`hold`), and the one-line message for a failed write. torch-free: `spo plot` and `spo experiment`
read folders without it.

- `layout`: the file names, which files are spo-align's own, `finished_at`;
- `lock`: one live run per folder (`hold`), across processes and the nodes of a shared filesystem;
- `lifecycle`: claim a folder (continue, start over or refuse), record the run in it, mark it complete;
- `checkpoints`: sealing, finding, verifying and rotating `checkpoint-N/` folders, durable writes;
- `checksums`: the fast file checksum seals carry (xxh3_64, crc32 without xxhash);
- `data_sources`: what each data source held when the run read it, and how it changed since;
- `recipe_hash`: the settings that decide a run, and their hash (the test of "the same run");
- `run_info`: run.json; `card`: the model card (README.md); `metrics_file`: metrics.jsonl;
- `disk`: telling a failed write (full disk, quota, read-only folder) from other failures.
"""

from spo_align.run_folder.checkpoints import (
    checkpoint_cost,
    checkpoint_folders,
    checkpoint_step,
    file_writer,
    flush_own_files,
    is_sealed,
    last_checkpoint,
    rotate,
    seal,
    write_durably,
)
from spo_align.run_folder.disk import is_write_failure, write_failure
from spo_align.run_folder.layout import (
    COMPLETE_MARKER,
    CURVES,
    METRICS,
    MODEL_CARD,
    REFERENCE_CACHE,
    RESOLVED_RECIPE,
    RUN_INFO,
    finished_at,
)
from spo_align.run_folder.lifecycle import (
    OutputFolderError,
    claim,
    complete,
    recipe_changes,
    unfinished_run_problem,
)
from spo_align.run_folder.lock import FolderInUse, hold
from spo_align.run_folder.metrics_file import (
    keep_records_up_to,
    metric_lines,
    metric_value,
    parse_step,
    read_metrics,
    record_step,
)
from spo_align.run_folder.run_info import read_run_info

__all__ = [
    "COMPLETE_MARKER",
    "CURVES",
    "METRICS",
    "MODEL_CARD",
    "REFERENCE_CACHE",
    "RESOLVED_RECIPE",
    "RUN_INFO",
    "FolderInUse",
    "OutputFolderError",
    "checkpoint_cost",
    "checkpoint_folders",
    "checkpoint_step",
    "file_writer",
    "flush_own_files",
    "hold",
    "is_sealed",
    "claim",
    "complete",
    "finished_at",
    "is_write_failure",
    "keep_records_up_to",
    "last_checkpoint",
    "metric_lines",
    "metric_value",
    "parse_step",
    "read_metrics",
    "read_run_info",
    "recipe_changes",
    "record_step",
    "rotate",
    "seal",
    "unfinished_run_problem",
    "write_durably",
    "write_failure",
]
