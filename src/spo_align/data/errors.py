"""The data package's error: a dataset that cannot be read, or lacks what the recipe says it holds.

A leaf module (standard library only), so that every reader can raise it without importing another reader:
`sources` (loading), `json_rows` (local JSON files) and `messages` (row shapes) each subclass or raise it.
"""

from __future__ import annotations


class DataSourceError(ValueError):
    """A dataset could not be read, or lacks what the recipe says it holds."""
