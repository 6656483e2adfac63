"""Where records live in etcd: `/mooncake-vllm/<namespace>/{instances,segments,stores}/<name>`.

Names are percent-encoded into one key component, so any name (an engine's "host:port", a
name with slashes) maps to exactly one key and back. The namespace ends with "/" in the prefix
so that namespace "a" never sees the keys of namespace "ab".
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import quote, unquote

from .base import MetadataConfigError

ROOT = "/mooncake-vllm"
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RecordKind = Literal["instance", "segment", "store"]
_DIRS: dict[str, RecordKind] = {"instances": "instance", "segments": "segment",
                              "stores": "store"}


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise MetadataConfigError(
            f"namespace {namespace!r} is invalid: use 1-128 characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return namespace


class KeyLayout:
    def __init__(self, namespace: str) -> None:
        self.namespace = check_namespace(namespace)
        self.prefix = f"{ROOT}/{namespace}/"

    def instance_key(self, instance_id: str) -> str:
        return f"{self.prefix}instances/{quote(instance_id, safe='')}"

    def segment_key(self, name: str) -> str:
        return f"{self.prefix}segments/{quote(name, safe='')}"

    def store_key(self, name: str) -> str:
        return f"{self.prefix}stores/{quote(name, safe='')}"

    def parse(self, key: str) -> tuple[RecordKind, str] | None:
        """(kind, name) of a key of ours, or None for a foreign key under the prefix."""
        if not key.startswith(self.prefix):
            return None
        directory, sep, encoded = key[len(self.prefix):].partition("/")
        kind = _DIRS.get(directory)
        if kind is None or not sep or not encoded or "/" in encoded:
            return None
        return kind, unquote(encoded)
