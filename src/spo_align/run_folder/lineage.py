"""Where a run's starting model came from, for its model card: the hub model it descends from, and its license.

The paper's flow is hub model -> SFT -> SPO: the SPO run starts from a local SFT folder, which is not on the hub.
Its card's `base_model` is the nearest hub model up the chain, found in each local folder's own card
(`base_model` in its front matter), else its `resolved_recipe.yaml` (`model.name_or_path`), else a LoRA
adapter's `adapter_config.json` (`base_model_name_or_path`); a folder that names none, or a chain that loops,
gives none.

The license is copied from the base's own card (a local folder's README.md, or a hub card in the local cache)
only whole: `license: other` is valid on the hub only with `license_name` and `license_link`, so without them
nothing is copied and the card says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MODEL_CARD = "README.md"
RESOLVED_RECIPE = "resolved_recipe.yaml"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_MAX_HOPS = 16


def front_matter_of(card: Path) -> dict[str, Any]:
    """The YAML front matter of a model card; empty when there is none or it cannot be read."""
    try:
        from huggingface_hub.repocard import metadata_load

        meta = metadata_load(card)
    except Exception:  # noqa: BLE001 - a card we cannot read tells us nothing
        return {}
    return meta if isinstance(meta, dict) else {}


def is_hub_id(name: str) -> bool:
    """A model name that can only be a hub id: not `tiny:`, not a path that exists or looks local."""
    if name.startswith("tiny:") or name.startswith(("/", "./", "../", "~")) or Path(name).exists():
        return False
    return bool(_HUB_ID.match(name))


def _named_parent(folder: Path) -> str | None:
    """What a local model folder says it was trained from: its card, resolved recipe or adapter config."""
    meta = front_matter_of(folder / MODEL_CARD) if (folder / MODEL_CARD).is_file() else {}
    named = meta.get("base_model")
    if isinstance(named, list) and named:
        named = named[0]
    if isinstance(named, str) and named.strip():
        return named.strip()
    try:
        recipe = yaml.safe_load((folder / RESOLVED_RECIPE).read_text(encoding="utf-8"))
        named = recipe["model"]["name_or_path"]
        if isinstance(named, str) and named.strip():
            return named.strip()
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        pass
    try:
        adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        named = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
        return named.strip() if isinstance(named, str) and named.strip() else None
    except (OSError, ValueError):
        return None


def hub_ancestor(model: str) -> str | None:
    """The hub model `model` is, or descends from through local folders; None when there is none."""
    if is_hub_id(model):
        return model
    folder = Path(model).expanduser()
    seen: set[Path] = set()
    for _ in range(_MAX_HOPS):
        if not folder.is_dir() or folder.resolve() in seen:
            return None
        seen.add(folder.resolve())
        named = _named_parent(folder)
        if named is None:
            return None
        if is_hub_id(named):
            return named
        nxt = Path(named).expanduser()
        folder = nxt if nxt.is_absolute() else folder / nxt
    return None


def _cached_hub_card(repo: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, MODEL_CARD, revision=revision)
    except Exception:  # noqa: BLE001 - not a repo id, or no cache: nothing is known
        return None
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


def base_card(model: str, revision: str | None) -> dict[str, Any]:
    """The front matter of the starting model's own card: a local folder's README.md, or a cached hub card."""
    if model.startswith("tiny:"):
        return {}
    local = Path(model).expanduser()
    card = local / MODEL_CARD if local.is_dir() else _cached_hub_card(model, revision)
    return front_matter_of(card) if card is not None and card.is_file() else {}


@dataclass(frozen=True)
class License:
    fields: dict[str, str]
    """What the card's front matter gets: {} or `license` (with `license_name` and `license_link` for other)."""
    note: str | None = None
    """Said in the card's text when the base's license could not be copied."""


def license_of(meta: dict[str, Any]) -> License:
    """The license fields of a base card's front matter, copied whole or not at all."""
    value = meta.get("license")
    if not value:
        return License({})
    if str(value) != "other":
        return License({"license": str(value)})
    name, link = meta.get("license_name"), meta.get("license_link")
    if name and link:
        return License({"license": "other", "license_name": str(name), "license_link": str(link)})
    return License(
        {},
        "The base's card says `license: other` without `license_name` and `license_link`, so no license is "
        "given above: read the base's terms and add them before you publish this model.",
    )
