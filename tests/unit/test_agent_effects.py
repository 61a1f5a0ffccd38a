"""Every trigger the table can fire has an effect in the runtime that posts its outcome (issue 10):
a trigger whose effect the runtime lacks would leave ``busy`` set forever, the same wedge as a
failed effect folded into a silent wait."""

from __future__ import annotations

import inspect

from fsm.machine import EFFECT, TABLE
from pgsidecar.agent import Agent


def test_every_trigger_with_an_effect_has_a_runtime_effect() -> None:
    missing = sorted(
        {
            row.trigger
            for row in TABLE
            if EFFECT[row.trigger] != "none" and not hasattr(Agent, f"_fx_{row.trigger}")
        }
    )
    assert missing == [], f"triggers with no _fx_<trigger> in pgsidecar/agent.py: {missing}"


def test_every_effect_posts_the_outcome_name_the_machine_waits_for() -> None:
    """The effect busy is set to (EFFECT[trigger]) is the name its runtime effect posts; a
    mismatch never clears ``busy``. Read from the source: each _fx_ posts ``name="<effect>"``
    itself (as ``Effect.<NAME>``) or through the helper it delegates to."""
    for row in TABLE:
        effect = EFFECT[row.trigger]
        if effect == "none":
            continue
        fn = getattr(Agent, f"_fx_{row.trigger}")
        src = inspect.getsource(fn)
        for callee in ("_handoff", "_fx_reclone", "_start_pg"):
            if callee in src and callee != "_start_pg":
                src += inspect.getsource(getattr(Agent, callee))
        assert f"name=Effect.{effect.name}" in src, (
            f"_fx_{row.trigger} (or what it calls) never posts an outcome named {effect!r}"
        )
