"""Reference log-probs: computed once before training, cached under the output folder, read back on resume.

The cache file is keyed by four hashes, all of which must match for a file to be used:
- model: its config and a fingerprint of the reference weights (per parameter: name, shape, dtype, the
  fp64 sum and a strided sample of 1024 values; LoRA parameters are left out, since the reference is the
  base with the adapter disabled);
- tokenizer: its serialised vocabulary/pipeline and chat template;
- data: the token ids of every pair, in training order;
- settings: max_length, the pack layout and pack_length, plus the batch size, order seed and mixed precision
  that decide the micro-batches and their bits (`PreferenceTrainer._grouping`).
The pass runs the micro-batches training runs (the trainer's own dataloader, on each rank its own share), since
in half precision a sequence's log-prob depends on its batch companions; under DeepSpeed the ranks' values are
gathered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from spo_align.train.logps import batch_logps

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_SAMPLE = 1024
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_attn_implementation", "_commit_hash", "use_cache")
"""Config entries that do not change log-probs (the Trainer itself sets use_cache=False)."""


class ReferenceCacheError(RuntimeError):
    """Reference log-probs are missing where they can no longer be computed correctly."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def _gathered(param: nn.Parameter) -> Iterator[torch.Tensor]:
    """The full parameter (ZeRO-3: gathered for the duration, on every rank)."""
    if _is_partitioned(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield param.data
    else:
        yield param.data


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's config and reference weights (adapter weights excluded)."""
    from spo_align.train.logps import unwrap_causal_lm

    causal = unwrap_causal_lm(model)
    h = hashlib.sha256()
    config = getattr(causal, "config", None)
    if config is not None:
        cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, param in sorted(causal.named_parameters(), key=lambda kv: kv[0]):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        with _gathered(param) as full:
            flat = full.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step][:_SAMPLE].to(torch.float64).cpu()
            total = float(torch.sum(flat, dtype=torch.float64))  # no fp64 copy of the parameter
        h.update(f"{name}:{tuple(full.shape)}:{full.dtype}:{total!r}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    template = getattr(tokenizer, "chat_template", None) or ""
    return _sha((body + "\n--template--\n" + str(template)).encode())


def data_fingerprint(ds: datasets.Dataset) -> str:
    h = hashlib.sha256()
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        h.update(column.encode())
        for ids in ds[column]:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(array("q", ids).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    model: str
    tokenizer: str
    data: str
    settings: str

    @property
    def digest(self) -> str:
        return _sha(json.dumps(asdict(self), sort_keys=True).encode())


def make_key(model: nn.Module, tokenizer: Any, ds: datasets.Dataset, settings: dict[str, Any]) -> CacheKey:
    return CacheKey(
        model=model_fingerprint(model),
        tokenizer=tokenizer_fingerprint(tokenizer),
        data=data_fingerprint(ds),
        settings=_sha(json.dumps(settings, sort_keys=True).encode()),
    )


@dataclass(frozen=True)
class ReferenceCache:
    """A folder of reference log-prob tables, one file per key (split name in the file name).

    Beside each table, `<file>.sha256` holds the SHA-256 of its bytes, written after the table. A table
    whose checksum is missing or wrong, or that does not load as a [N, 2] table for its key (a run killed
    while writing, a truncated copy, a full disk), is reported, deleted and computed again."""

    directory: Path

    def path(self, key: CacheKey, split: str) -> Path:
        return self.directory / f"{split}-{key.digest[:24]}.pt"

    @staticmethod
    def checksum_path(path: Path) -> Path:
        return path.with_name(path.name + ".sha256")

    def _damage(self, path: Path) -> str | None:
        """Why the file at `path` cannot be used for `key`, or None if it can."""
        checksum = self.checksum_path(path)
        if not checksum.is_file():
            return "its checksum file is missing"
        data = path.read_bytes()
        if _sha(data) != checksum.read_text(encoding="utf-8").strip():
            return f"its checksum does not match ({len(data)} bytes)"
        return None

    def _discard(self, path: Path, reason: str) -> None:
        logger.warning("reference cache %s is damaged (%s): deleting it and computing the log-probs again", path, reason)
        path.unlink(missing_ok=True)
        self.checksum_path(path).unlink(missing_ok=True)

    def load(self, key: CacheKey, split: str) -> torch.Tensor | None:
        path = self.path(key, split)
        if not path.is_file():
            return None
        reason = self._damage(path)
        if reason is None:
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is treated alike: recomputed
                reason = f"it does not load: {type(exc).__name__}"
            else:
                table = stored.get("logps") if isinstance(stored, dict) else None
                if not isinstance(table, torch.Tensor) or table.ndim != 2 or table.shape[1] != 2:
                    reason = "it holds no [N, 2] table"
        if reason is not None:
            self._discard(path, reason)
            return None
        if stored.get("key") != asdict(key):
            logger.warning("reference cache %s was written for another key; recomputing", path)
            return None
        logger.info("reference log-probs read from %s", path)
        return table

    def save(self, key: CacheKey, split: str, table: torch.Tensor) -> Path:
        path = self.path(key, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": asdict(key), "logps": table.cpu()}, tmp)
        digest = _sha(tmp.read_bytes())
        self.checksum_path(path).unlink(missing_ok=True)  # never a new table beside an old checksum
        tmp.replace(path)
        checksum_tmp = self.checksum_path(path).with_suffix(f".tmp{os.getpid()}")
        checksum_tmp.write_text(digest + "\n", encoding="utf-8")
        checksum_tmp.replace(self.checksum_path(path))
        logger.info("reference log-probs (%d pairs) written to %s", table.shape[0], path)
        return path


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the duration, its training mode restored after: the reference
    of a LoRA run is the training policy itself with its adapter off, and must compute what a frozen
    reference would even when the recipe keeps dropout (`training.disable_dropout: false`)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Disable the peft adapter found under DeepSpeed/DDP wrappers (the reference of a LoRA run)."""
    inner: Any = model
    for _ in range(4):
        if hasattr(inner, "disable_adapter"):
            with inner.disable_adapter():
                yield
            return
        inner = getattr(inner, "module", None)
        if inner is None:
            break
    raise TypeError("the model has no peft adapter to disable")


def consecutive_batches(
    ds: datasets.Dataset, collate: Callable[[list[dict[str, Any]]], dict[str, Any]], batch_size: int
) -> Iterator[dict[str, Any]]:
    """Collated micro-batches of `batch_size` consecutive pairs (a single process reading `ds` in order)."""
    for start in range(0, len(ds), batch_size):
        yield collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])


def compute_reference_table(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    num_pairs: int,
    *,
    device: torch.device,
    disable_adapter: bool,
    world_size: int = 1,
    on_forward: Callable[[], None] | None = None,
) -> torch.Tensor:
    """[N, 2] float32 table of reference (chosen, rejected) log-probs, row i = pair_index i.

    `batches` are this rank's collated micro-batches, the very ones its training (or evaluation) will run:
    in half precision a sequence's log-prob depends on its batch companions (padded width, packed row,
    matmul shapes), so only the same grouping gives the same values (PreferenceTrainer passes its own
    dataloader, whose order is the same every epoch). Under DeepSpeed every rank runs as many forwards as
    its dataloader yields, the same count on every rank (accelerate's even batches), which ZeRO-3's
    collective weight gathering needs; the ranks' values are then gathered. A pair met twice (accelerate
    completes an uneven last batch with pairs from the start) keeps the value of its first batch, in rank
    order.
    """
    indices: list[int] = []
    values: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    context = adapter_disabled(model) if disable_adapter else contextlib.nullcontext()
    try:
        with torch.no_grad(), context:
            for collated in batches:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}
                logps = batch_logps(model, batch).float().cpu()
                if on_forward is not None:
                    on_forward()
                b = int(batch["pair_index"].shape[0])
                indices.extend(int(i) for i in batch["pair_index"].tolist())
                values.append(torch.stack([logps[:b], logps[b:]], dim=1))
    finally:
        model.train(was_training)
    local = (indices, torch.cat(values) if values else torch.zeros(0, 2))
    parts = [local]
    if world_size > 1:
        import torch.distributed as dist

        parts = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(parts, local)
    table = torch.full((num_pairs, 2), float("nan"), dtype=torch.float32)
    for idx, vals in parts:  # type: ignore[misc]
        for row, pair in enumerate(idx):
            if not 0 <= pair < num_pairs:
                raise ReferenceCacheError(f"reference pass met pair_index {pair}, outside 0..{num_pairs - 1}")
            if torch.isnan(table[pair, 0]):
                table[pair] = vals[row]
    if torch.isnan(table).any():
        raise ReferenceCacheError("reference pass left pairs without log-probs (pair_index not 0..N-1?)")
    return table
