"""The metric names a PromQL expression selects, read by a small tokenizer (no PromQL parser is
installed here, and promtool 2.42 has no command that prints a query's selectors).

It knows enough of the grammar to tell a metric name from every other identifier: label names
inside ``{...}`` (but ``{__name__="x"}`` selects ``x``), label lists after ``by``, ``without``,
``on``, ``ignoring``, ``group_left`` and ``group_right``, range and subquery brackets
(durations, Grafana's ``$__rate_interval``), durations after ``offset``, functions and
aggregations (an identifier followed by ``(``, or an aggregation followed by ``by``/``without``),
the binary operator keywords, strings, numbers and Grafana's ``$variables``. What is left is a
metric name. An expression it cannot tokenize is an error, never a silent empty set.
"""

from __future__ import annotations

import re

__all__ = ["PromQLError", "metric_names", "tokens"]


class PromQLError(ValueError):
    pass


# PromQL's aggregation operators: they may take their grouping before the parentheses
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)
# followed by a parenthesised list of label names
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2"}) | GROUPING
# number literals PromQL spells as words
NUMBER_WORDS = frozenset({"inf", "nan"})

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w:]))
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>==|!=|=~|!~|<=|>=|[-+*/%^<>=@,:(){}\[\]])
    """,
    re.VERBOSE,
)


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of each token, without white space and comments."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"cannot tokenize {expr[pos : pos + 20]!r} in {expr!r}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, m.group(0)))
        pos = m.end()
    return out


def _closing(toks: list[tuple[str, str]], start: int, open_: str, close: str) -> int:
    """The index of the token closing the bracket opened at ``start``."""
    depth = 0
    for i in range(start, len(toks)):
        if toks[i] == ("op", open_):
            depth += 1
        elif toks[i] == ("op", close):
            depth -= 1
            if depth == 0:
                return i
    raise PromQLError(f"unbalanced {open_!r}")


def _unquote(s: str) -> str:
    if s.startswith("`"):
        return s[1:-1]
    return re.sub(r"\\(.)", r"\1", s[1:-1])


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects."""
    toks = tokens(expr)
    names: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if (kind, text) == ("op", "{"):
            end = _closing(toks, i, "{", "}")
            inner = toks[i + 1 : end]
            # {__name__="x"} is the selector x
            for j in range(len(inner) - 2):
                if inner[j] == ("ident", "__name__") and inner[j + 1] == ("op", "="):
                    if inner[j + 2][0] == "string":
                        names.add(_unquote(inner[j + 2][1]))
            i = end + 1
            continue
        if (kind, text) == ("op", "["):
            i = _closing(toks, i, "[", "]") + 1
            continue
        if kind != "ident":
            i += 1
            continue
        lowered = text.lower()
        if lowered in GROUPING:
            # a label list follows (optional after group_left/group_right)
            i = _closing(toks, i + 1, "(", ")") + 1 if nxt == ("op", "(") else i + 1
            continue
        if lowered == "offset":
            i += 2 if nxt[0] in ("duration", "variable") else 1
            continue
        if nxt == ("op", "(") or (
            lowered in AGGREGATIONS and nxt[0] == "ident" and nxt[1].lower() in GROUPING
        ):
            i += 1  # a function or an aggregation
            continue
        if lowered not in KEYWORDS and lowered not in NUMBER_WORDS:
            names.add(text)
        i += 1
    return names
