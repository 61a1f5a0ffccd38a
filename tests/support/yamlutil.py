"""YAML for the tests that read deploy/ (many documents, read by many tests): PyYAML's safe
loader on libyaml (``CSafeLoader``, the same constructors and resolver as ``yaml.safe_load``,
the C parser under them) where PyYAML was built with it, as the wheels are; the pure-Python
safe loader otherwise. The pure-Python parser was most of the time those tests took."""

from __future__ import annotations

from typing import Any

import yaml

SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=SafeLoader)


def safe_load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=SafeLoader))
