"""`tokentrail explore`: a local web app that places prompts typed live on a run's stored map.

- `session`: `ExploreSession`, the run's map, its model, live placement, steering, adding prompts (no web);
- `schemas`: the HTTP API's request and response bodies;
- `app`: the FastAPI app (page, assets, JSON API);
- `server`: `serve`, what the command runs.
"""

from tokentrail.explore.session import (
    AlreadyStored,
    ExploreBusy,
    ExploreSession,
    LivePrompt,
    ModelGate,
    ModelUnavailable,
)

__all__ = ["AlreadyStored", "ExploreBusy", "ExploreSession", "LivePrompt", "ModelGate", "ModelUnavailable"]
