"""Deterministic simulation: a virtual-time event loop (``clock``), a simulated DCS store
(``dcs``), a model of PostgreSQL members with a network and a recording client (``postgres``),
invariant checkers (``invariants``) and the harness that runs one agent per member under a
seeded fault schedule (``cluster``). See docs/simulation.md."""
