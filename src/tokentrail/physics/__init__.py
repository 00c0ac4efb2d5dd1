"""The seed's physical framing made measurable on a traced run (`tokentrail physics`).

- `measures`: `PhysicsOptions`, `PhysicsResult`, the stored-state measures and the model probes;
- `outputs`: the headline readings (`physics/summary.json`), the tables and the figures;
- `pipeline`: `physics_run`.
"""

from tokentrail.physics.measures import PhysicsOptions, PhysicsResult, measure_stored, measure_with_model
from tokentrail.physics.pipeline import physics_run

__all__ = ["PhysicsOptions", "PhysicsResult", "measure_stored", "measure_with_model", "physics_run"]
