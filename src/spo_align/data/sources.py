"""Read the datasets a recipe names: hub ids, local dataset folders, or JSON/JSONL/Parquet files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from spo_align.recipe.schema import DatasetSource

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataSourceError(ValueError):
    """A dataset could not be read, or lacks what the recipe says it holds."""


def resolve_source_path(source: DatasetSource, base_dir: Path | None) -> str:
    """A local path relative to the recipe's folder if it exists there, else the string as given (hub id)."""
    raw = Path(source.path).expanduser()
    candidates = [raw] if raw.is_absolute() else ([base_dir / raw] if base_dir else []) + [raw]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate.resolve())
    return source.path


def load_source(source: DatasetSource, base_dir: Path | None = None) -> datasets.Dataset:
    """Load one source as a `datasets.Dataset` (the split it names)."""
    import datasets

    location = resolve_source_path(source, base_dir)
    suffix = Path(location).suffix.lower()
    try:
        if suffix in _FILE_BUILDERS and Path(location).is_file():
            ds = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=location, split="train")
        elif Path(location).is_dir() and (Path(location) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(location)
        elif Path(location).is_dir() and (Path(location) / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(location)[source.split]
        else:
            ds = datasets.load_dataset(location, source.name, split=source.split, revision=source.revision)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, OSError) as exc:
        raise DataSourceError(f"cannot read dataset {source.path!r} (split {source.split!r}): {exc}") from exc
    logger.info("read %d rows from %s [%s]", len(ds), source.path, source.split)
    return ds


def sample_source(ds: datasets.Dataset, source: DatasetSource, *, shuffle: bool, seed: int) -> datasets.Dataset:
    """Shuffle a loaded source (seeded) if asked, then keep its first `max_samples` rows, as the schema says."""
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if source.max_samples is not None:
        ds = ds.select(range(min(source.max_samples, len(ds))))
    return ds
