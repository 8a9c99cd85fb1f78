"""`spo new SRC DEST`: copy a recipe for editing, keeping its comments and keeping its relative paths right.

A recipe's `extends`, DeepSpeed/hostfile paths and local dataset paths are relative to its own file;
the copy rewrites exactly those values (and nothing else) so that they point at the same files from
the new folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

_PLAIN = re.compile(r"^[A-Za-z0-9_./+-]+$")


class CopyRecipeError(ValueError):
    """The copy cannot be made (source missing, destination taken)."""


def _file_path_nodes(root: yaml.MappingNode, src_dir: Path) -> list[yaml.ScalarNode]:
    """Scalar nodes holding paths relative to the recipe file."""

    def child(node: yaml.Node | None, key: str) -> yaml.Node | None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                    return value
        return None

    found: list[yaml.Node | None] = [child(root, "extends")]
    distributed = child(root, "distributed")
    found += [child(distributed, "deepspeed"), child(distributed, "hostfile")]
    data = child(root, "data")
    for split in ("train", "eval"):
        sources = child(data, split)
        if isinstance(sources, yaml.SequenceNode):
            for source in sources.value:
                path = child(source, "path")
                if isinstance(path, yaml.ScalarNode) and (src_dir / path.value).exists():
                    found.append(path)
    return [node for node in found if isinstance(node, yaml.ScalarNode) and node.value and node.tag.endswith(":str")]


def copy_recipe(src: Path, dest: Path, *, overwrite: bool = False) -> Path:
    """Copy `src` to `dest` (a file, or a folder to copy into); return the file written."""
    if not src.is_file():
        raise CopyRecipeError(f"{src}: no such recipe file")
    if dest.is_dir():
        dest = dest / src.name
    if dest.suffix not in (".yaml", ".yml"):
        raise CopyRecipeError(f"{dest}: a recipe file name ends in .yaml or .yml")
    if dest.exists() and not overwrite:
        raise CopyRecipeError(f"{dest} exists; pass --force to overwrite it")
    text = src.read_text(encoding="utf-8")
    src_dir, dest_dir = src.resolve().parent, dest.parent.resolve()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None  # copied verbatim; `spo validate` will point at the syntax error
    if isinstance(root, yaml.MappingNode) and src_dir != dest_dir:
        edits = []
        for node in _file_path_nodes(root, src_dir):
            if os.path.isabs(node.value):
                continue
            new = os.path.relpath(src_dir / node.value, dest_dir)
            edits.append((node.start_mark.index, node.end_mark.index, new if _PLAIN.match(new) else json.dumps(new)))
        for start, end, new in sorted(edits, reverse=True):
            text = text[:start] + new + text[end:]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    return dest
