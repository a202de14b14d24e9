"""Reading a user's YAML file with bounds: a bad file gets an error naming it, never a hang.

PyYAML's ``safe_load`` runs no code but trusts the file's shape: an alias bomb ("billion
laughs") expands into more objects than memory holds, a recursive anchor or deep nesting ends
in ``RecursionError``, a binary file in ``UnicodeDecodeError``, and a key given twice silently
keeps the later value. Here each of those is a ``ConfigError`` saying what is wrong and where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

MAX_BYTES = 4 * 1024 * 1024  # LPOT's largest files are a few KB
MAX_NODES = 100_000  # values once every alias is expanded: a bomb has billions
MAX_DEPTH = 64


class BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that limits nesting and refuses recursive anchors and duplicate keys."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0
        self.open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self.open_anchors:
                raise _Refused(f"alias *{event.anchor} refers to a node that contains it", event)
            return super().compose_node(parent, index)
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event)
        if anchor:
            self.open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1
            self.open_anchors.discard(anchor)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *defaults``: merged values may be overridden, as YAML allows
            key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise _Refused(f"key {key!r} is given twice in one mapping", key_node)
            seen.add(key)
        return super().construct_mapping(node, deep)


def expanded_size(node: Any, sizes: Optional[dict[int, int]] = None) -> int:
    """How many values ``node`` stands for once every alias in it is expanded (aliases share
    their node, so this takes time linear in the file, not in the expansion)."""
    sizes = {} if sizes is None else sizes
    if id(node) not in sizes:
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[id(node)] = 1 + sum(expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _tagged(loader: BoundedLoader, suffix: str, node: Any) -> Any:
    """A value under a tag of LPOT's own (``!Pruner``) is read as the plain value it tags: the key
    holding it (``pruning``) then gets its own answer from the schema."""
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


BoundedLoader.add_multi_constructor("!", _tagged)


class _Refused(Exception):
    def __init__(self, message: str, where: Any):
        mark = getattr(where, "start_mark", None)
        super().__init__(f"{message} (line {mark.line + 1})" if mark is not None else message)


def read_yaml(path: Path) -> Any:
    """The document in the YAML file ``path``; ConfigError naming the file if it can't be one."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a tuning file is at most {MAX_BYTES} bytes")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file") from None
    except OSError as error:
        raise ConfigError(f"{path}: can't read it: {error.strerror or error}") from None
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node) > MAX_NODES:
            raise _Refused(f"its aliases (*name) expand to more than {MAX_NODES} values: refused as an alias bomb", node)
        return loader.construct_document(node)
    except _Refused as error:
        raise ConfigError(f"{path}: {error}") from None
    except (yaml.YAMLError, ValueError) as error:  # ValueError: a value YAML can't be, e.g. a date 2001-13-01
        raise ConfigError(f"{path}: malformed YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    finally:
        loader.dispose()
