"""Read the datasets a recipe names: hub ids, local dataset folders, or JSON/JSONL/CSV/TSV/Parquet files, each
optionally compressed (.gz, .bz2, .xz; `spo_align.data.local_files`).

Every loaded dataset gains a `ROW_COLUMN` that says where each row came from (``file:line`` for local JSON
Lines and CSV, ``<dataset> [<split>] row N`` otherwise), kept through shuffling and conversion, so that an error about a
row names the row in the user's file rather than its position after shuffling.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from spo_align.data.errors import DataSourceError
from spo_align.recipe.schema import DatasetSource

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

ROW_COLUMN = "_row"
"""Column added to every loaded dataset: where each row came from, for error messages."""


def resolve_source_path(source: DatasetSource, base_dir: Path | None) -> str:
    """The local file or folder a source names (relative to the recipe's folder, else the working directory),
    or the string as given (a hub id); the same rule `spo validate` checks paths with."""
    from spo_align.recipe.paths import data_location

    location = data_location(source.path, base_dir if base_dir is not None else Path.cwd())
    return str(location) if location is not None else source.path


def data_columns(ds: datasets.Dataset) -> list[str]:
    """The dataset's own columns (without `ROW_COLUMN`), for messages that list them."""
    return [c for c in ds.column_names if c != ROW_COLUMN]


def load_source(source: DatasetSource, base_dir: Path | None = None) -> datasets.Dataset:
    """Load one source as a `datasets.Dataset` (the split it names), with `ROW_COLUMN` added."""
    import datasets
    from datasets.exceptions import DatasetGenerationError
    from pyarrow import ArrowException

    location = resolve_source_path(source, base_dir)
    local = Path(location)
    kind = None
    if local.is_file():
        from spo_align.data import local_files
        from spo_align.data.json_rows import read_json_rows, rows_to_dataset

        kind = local_files.file_kind(local)  # refuses a name that says no readable kind, naming those that do
        if kind in (".jsonl", ".json", ".csv", ".tsv"):
            rows = read_json_rows(local) if kind in (".jsonl", ".json") else local_files.read_csv_rows(local)
            ds = rows_to_dataset(rows, local, ROW_COLUMN)
            logger.info("read %d rows from %s", len(ds), source.path)
            return ds
    try:
        if kind == ".parquet" and local_files.is_compressed(local):
            ds = local_files.read_compressed_parquet(local)
        elif kind == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=location, split="train")
        elif Path(location).is_dir() and (Path(location) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(location)
        elif Path(location).is_dir() and (Path(location) / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(location)[source.split]
        else:
            ds = datasets.load_dataset(location, source.name, split=source.split, revision=source.revision)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, OSError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"cannot read dataset {source.path!r} (split {source.split!r}): {exc}") from None
    except (DatasetGenerationError, ArrowException, StopIteration) as exc:  # a reader's failure, wrapped
        cause = exc.__cause__ or exc
        raise DataSourceError(
            f"cannot read dataset {source.path!r} (split {source.split!r}): {type(cause).__name__}: {cause}"
        ) from None
    if len(ds) == 0:
        raise DataSourceError(f"dataset {source.path!r} (split {source.split!r}) has no rows")
    logger.info("read %d rows from %s [%s]", len(ds), source.path, source.split)
    if ROW_COLUMN in ds.column_names:
        ds = ds.remove_columns(ROW_COLUMN)
    label = f"{source.path} [{source.split}]"
    return ds.add_column(ROW_COLUMN, [f"{label} row {i}" for i in range(len(ds))])


def sample_source(ds: datasets.Dataset, source: DatasetSource, *, shuffle: bool, seed: int) -> datasets.Dataset:
    """Shuffle a loaded source (seeded) if asked, then keep its first `max_samples` rows, as the schema says."""
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if source.max_samples is not None:
        ds = ds.select(range(min(source.max_samples, len(ds))))
    return ds
