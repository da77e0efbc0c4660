"""Errors the server's command line reports in one line (kept free of heavy imports, so the CLI stays fast)."""
from __future__ import annotations


class StateMismatch(RuntimeError):
    """The run directory holds a run this server's settings cannot continue (not damage: nothing is set aside)."""
