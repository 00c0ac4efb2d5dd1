"""The HTTP API's request and response bodies (pydantic), documented in docs/explore.md.

Requests are validated before anything runs: unknown fields, empty or over-long prompts, out-of-range numbers
are refused with 422 and a message naming the field. Responses are plain JSON: numbers as floats (null where a
measure is undefined, never NaN), arrays nested `[layer][component]`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# A prompt for live tracing: long enough for any seed-style prompt and short enough that one request cannot hold
# the model for long. The token limit (MAX_PROMPT_TOKENS) is checked after tokenising.
MAX_PROMPT_CHARS = 2000
MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 64
MAX_NAME_CHARS = 200
# The largest request body accepted (413 above it): a maximal prompt as JSON-escaped UTF-8 fits many times over.
MAX_BODY_BYTES = 64 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The prompt text, as the model sees it.")


class TraceRequest(_Strict):
    prompt: str = Prompt
    category: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS,
        description="The category whose departure the bifurcation measures (default: the nearest at layer 1).")


class StoreRequest(_Strict):
    prompt: str = Prompt
    category: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    id: str | None = Field(default=None, max_length=MAX_NAME_CHARS,
                           description="Prompt id (default: derived from category and text, as in prompt files).")
    label: str = Field(default="", max_length=MAX_NAME_CHARS)


class SteerRequest(_Strict):
    prompt: str = Prompt
    layer: int = Field(ge=1, description="Block whose output is steered (1..L).")
    alpha: float = Field(ge=-64, le=64, allow_inf_nan=False,
                         description="Coefficient in units of the run's median residual norm at the layer.")
    source: str | None = Field(default=None, max_length=MAX_NAME_CHARS,
                               description="Category the direction points away from (with target).")
    target: str | None = Field(default=None, max_length=MAX_NAME_CHARS,
                               description="Category the direction points toward (with source).")
    vector_file: str | None = Field(default=None, max_length=1000,
                                    description="A .npy or .safetensors vector inside the run directory, instead "
                                                "of two categories.")
    position: Literal["last", "prompt", "all"] = "last"
    max_new_tokens: int = Field(default=24, ge=1, le=MAX_NEW_TOKENS)


class TokenProb(BaseModel):
    token: str
    prob: float


class Neighbour(BaseModel):
    index: int
    id: str
    category: str
    cosine: float


class LayerReading(BaseModel):
    layer: int
    neighbours: list[Neighbour]
    vote: dict[str, int]
    winner: str
    lens: list[TokenProb]
    axis_score: float | None


class Bifurcation(BaseModel):
    home: str
    layer: int
    toward: str
    sustain: int
    sentence: str


class TraceResponse(BaseModel):
    prompt: str
    tokens: list[str]
    projection: list[list[float]]
    depth: list[list[float]]
    layers: list[LayerReading]
    bifurcation: Bifurcation
    next_tokens: list[TokenProb]
    seconds: float


class Continuation(BaseModel):
    text: str
    projection: list[list[float]]
    depth: list[list[float]]


class SteerResponse(BaseModel):
    prompt: str
    layer: int
    alpha: float
    position: str
    direction: str
    scale: float
    baseline: Continuation
    steered: Continuation
    seconds: float


class StoreResponse(BaseModel):
    id: str
    category: str
    n_prompts: int
    message: str
