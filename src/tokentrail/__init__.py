"""tokentrail: trace how a prompt's next-token state moves through a transformer's layers.

In a notebook, `import tokentrail as tt`: `tt.load_model`, `tt.trace`, `tt.trace_run`, `tt.open_run`,
`tt.explore` (see `tokentrail.api`).
Importing the package loads nothing heavy; torch comes with the first model.
"""

from __future__ import annotations

from typing import Any

from tokentrail._version import __version__

_API = ("load_model", "trace", "trace_run", "open_run", "explore", "Run")
_CORE = ("Trace", "TraceOptions")
__all__ = ["Run", "Trace", "TraceOptions", "__version__", "explore", "load_model", "open_run", "trace", "trace_run"]


def __getattr__(name: str) -> Any:
    # On first use, so that `import tokentrail` stays light (the tracer and torch come with the first model).
    if name in _API:
        from tokentrail import api

        return getattr(api, name)
    if name in _CORE:
        from tokentrail.core import trace as core_trace

        return getattr(core_trace, name)
    raise AttributeError(f"module 'tokentrail' has no attribute {name!r}")
