"""Shared paths for the recipe tests."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BROKEN = REPO / "tests" / "data" / "broken_recipes"
RECIPE_ROOTS = (REPO / "recipes", REPO / "spo_recipes")


def repo_recipes() -> list[Path]:
    """Every recipe file in the repository's recipe trees, found recursively."""
    return sorted(p for root in RECIPE_ROOTS for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))
