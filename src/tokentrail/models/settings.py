"""How a run names and loads its model: settings that travel (to run.json, to Ray workers) without a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokentrail.models.sources import dtype_name, fingerprint, resolve_source

if TYPE_CHECKING:
    from tokentrail.models.loading import LoadedModel


@dataclass(frozen=True)
class ModelSettings:
    spec: str = "default"
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    device_map: str | None = None
    self_check: bool = True
    dtype_requested: str | None = None  # "auto" when `dtype` is what auto chose here; None when asked for as is

    def __post_init__(self) -> None:
        # auto is resolved once, here: the fingerprint, the store, run.json and a Ray worker elsewhere all get
        # the dtype actually used, so a store traced in bfloat16 never passes for a float32 one.
        if self.dtype == "auto":
            object.__setattr__(self, "dtype_requested", "auto")
            object.__setattr__(self, "dtype", dtype_name("auto", self.device, self.device_map))

    def load(self) -> LoadedModel:
        from tokentrail.models import load_model

        return load_model(self.spec, revision=self.revision, dtype=self.dtype, device=self.device,
                          trust_remote_code=self.trust_remote_code, device_map=self.device_map,
                          self_check=self.self_check)

    def fingerprint(self) -> dict[str, Any]:
        """The model's identity from its files alone: a rerun with nothing to trace never loads it."""
        return fingerprint(resolve_source(self.spec, self.revision), self.dtype)
