"""Deterministic simulation: a virtual-time event loop (``clock``), a simulated DCS store
(``dcs``) and a model of PostgreSQL members with a network and a recording client
(``postgres``). See docs/simulation.md."""
