"""The agent runtime, in parts: the loop (loop.py), its input sources (sources.py), the effects
(effects.py), what it publishes beside the machine (membership.py), the PostgreSQL configuration
it writes (pgconfig.py), the recorder (recorder.py), and the ports through which the world comes
in (ports.py). factory.py builds the real agent from its config."""

from pgsidecar.agent.factory import build_agent
from pgsidecar.agent.loop import Agent, AgentExit

__all__ = ["Agent", "AgentExit", "build_agent"]
