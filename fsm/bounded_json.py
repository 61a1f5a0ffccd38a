"""JSON from outside (the DCS, Kafka, the journal, the REST API), decoded within bounds.

``json.loads`` accepts things that are well-formed but hostile to the code that reads the result:
nesting thousands deep (``RecursionError`` while decoding, or later in whatever walks the value),
integers thousands of digits long (``ValueError`` past Python's digit limit, ``OverflowError`` once
something converts one to float), ``NaN`` and ``Infinity`` (not JSON at all, but accepted by
default; NaN compares false with everything, so a guard that reads it is silently bypassed).
``loads`` refuses all of them with a ValueError that names what is wrong, so every caller has one
exception to catch: the value is skipped and counted, and the reader goes on.
"""

from __future__ import annotations

import json
import math
from typing import Any

# deeper than anything this project writes (records nest three or four levels)
MAX_DEPTH = 32
# an LSN is an unsigned 64-bit integer: nothing we read is larger
MAX_INT = 2**64
# larger than any value this project writes (a member key is a few hundred bytes)
MAX_BYTES = 1 << 20


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def loads(raw: str | bytes) -> Any:
    """Decode ``raw``; raises ValueError naming the first bound it breaks."""
    if len(raw) > MAX_BYTES:
        raise ValueError(f"value of {len(raw)} bytes is larger than {MAX_BYTES}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    except ValueError as exc:  # JSONDecodeError, the digit limit, our NaN refusal
        raise ValueError(f"not valid JSON: {exc}") from None
    check(value)
    return value


def check(value: Any) -> None:
    """Refuse a decoded value (or one built by a library) that breaks the bounds. Iterative: a
    deep value must not overflow the stack of the check meant to catch it."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            children = v.values() if isinstance(v, dict) else v
            stack.extend((c, depth + 1) for c in children)
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int):
            if not -MAX_INT < v < MAX_INT:
                raise ValueError(f"an integer of {len(str(abs(v)))} digits is out of range")
        elif isinstance(v, float) and not math.isfinite(v):
            # 1e400 decodes to inf
            raise ValueError(f"{v} is not a finite number")
