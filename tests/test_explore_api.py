"""`tokentrail explore`'s HTTP API on a run made by the CLI with a tiny model: every endpoint with good and bad
input, numbers checked against the model's own `output_hidden_states`, scikit-learn's PCA and hand-computed
centroids, the run's own metrics/projection.csv, a read-only run, and 20 concurrent requests on a real server."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sklearn.decomposition import PCA

import tokentrail as tt
from tokentrail import cli
from tokentrail.errors import TokentrailError
from tokentrail.explore import ExploreBusy, ExploreSession, ModelGate
from tokentrail.explore.app import create_app
from tokentrail.store import TraceStore

PROMPTS = {
    "story": ["Once upon a time in a castle", "The capital of France is Paris. Once upon", "All men are mortal."],
    "code": ["def fibonacci(n): return n if n", "import numpy as np", "return fibonacci(n - 1) +"],
    "math": ["Solve: 15 * 12 + 4 =", "The square root of 144 is", "15 * 12 + 4 = 184. 12 *"],
}
LIVE = "If John has 50 apples and gives 12 to Mary"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("explore")
    (folder / "prompts.json").write_text(json.dumps(PROMPTS))
    assert cli.main(["run", str(folder / "prompts.json"), "--model", str(tiny_model_dir), "--out",
                     str(folder / "run"), "-q", "--permutations", "9", "--axis", "story,code"]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def session(run_dir) -> ExploreSession:
    opened = ExploreSession(run_dir)
    opened.start_loading()
    assert opened.wait_for_model(120), opened.model_problem
    return opened


@pytest.fixture(scope="module")
def client(session) -> TestClient:
    return TestClient(create_app(session))


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    """The tiny model and tokenizer straight from transformers: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def hidden_states(hf, text: str) -> np.ndarray:
    """`[L, hidden]`: the last token after layers 0..L-1, from the model's own output_hidden_states (its last entry
    is after the final norm, so the last block's raw output, tokentrail's layer L, is not among them)."""
    model, tokenizer = hf
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    states = [h[0, -1].numpy() for h in out.hidden_states[:-1]]
    return np.stack(states).astype(np.float64)


def stored_states(run_dir) -> tuple[np.ndarray, list[str], list[str]]:
    trace = tt.open_run(run_dir).trace
    return np.asarray(trace.states, dtype=np.float64), list(trace.categories), list(trace.prompt_ids)


def sign_aligned(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`values` with each component's sign flipped to agree with `reference` (a PCA component has no sign)."""
    signs = np.sign(np.sum(reference * values, axis=tuple(range(values.ndim - 1))))
    return values * signs


# --- the stored map ----------------------------------------------------------------------------------------------


def test_map_is_the_runs_own_projection(client, run_dir):
    body = client.get("/api/map").json()
    with open(run_dir / "metrics" / "projection.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    projection = np.asarray(body["projection"])
    ids = [p["id"] for p in body["prompts"]]
    for row in rows:
        i, layer = ids.index(row["prompt_id"]), int(row["layer"])
        np.testing.assert_allclose(projection[i, layer, :2], [float(row["pc1"]), float(row["pc2"])], atol=2e-5)
    assert projection.shape[2] == 3 and body["layers"] == [str(n) for n in range(projection.shape[1])]
    assert body["categories"] == list(PROMPTS) and body["axis"] == ["story", "code"]
    assert len(body["depth"][0]) == body["n_layers"] + 1
    assert all(isinstance(token, str) for token in body["lens_tokens"][0])


def test_map_matches_scikit_learn_pca_of_the_stored_states(client, run_dir):
    states, _, _ = stored_states(run_dir)
    n, layers, hidden = states.shape
    reference = PCA(3, svd_solver="full").fit(states.reshape(-1, hidden))
    expected = reference.transform(states.reshape(-1, hidden)).reshape(n, layers, 3)
    got = np.asarray(client.get("/api/map").json()["projection"])
    np.testing.assert_allclose(sign_aligned(expected, got), expected, atol=1e-3)


def test_info_and_page_assets(client):
    info = client.get("/api/info").json()
    assert info["model_status"] == "ready" and info["read_only"] is False and info["model_problem"] is None
    assert info["n_prompts"] == 9 and info["categories"] == list(PROMPTS) and info["busy"] is False
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("plotly.min.js", "explore.js", "explore.css"):
        assert client.get(f"/assets/{name}").status_code == 200
    assert client.get("/assets/run.json").status_code == 404
    assert client.get("/assets/..%2Frun.json").status_code == 404
    assert client.get("/assets/../../run.json").status_code == 404


# --- a live prompt -------------------------------------------------------------------------------------------------


def test_live_prompt_is_placed_by_the_models_own_states(client, run_dir, hf):
    body = client.post("/api/trace", json={"prompt": LIVE}).json()
    live = hidden_states(hf, LIVE)
    states, categories, ids = stored_states(run_dir)
    n, layers, hidden = states.shape
    # Projection: the stored fit, reproduced by scikit-learn and applied to output_hidden_states.
    reference = PCA(3, svd_solver="full").fit(states.reshape(-1, hidden))
    stored_expected = reference.transform(states.reshape(-1, hidden)).reshape(n, layers, 3)
    signs = np.sign(np.sum(stored_expected * np.asarray(client.get("/api/map").json()["projection"]), axis=(0, 1)))
    seen = len(live)
    np.testing.assert_allclose(np.asarray(body["projection"])[:seen] * signs, reference.transform(live), atol=1e-3)
    # Nearest prompts and the axis score, by hand from the same states.
    unit = states / np.linalg.norm(states, axis=-1, keepdims=True)
    cosine = unit @ (live / np.linalg.norm(live, axis=-1, keepdims=True)).T  # [prompts, layers, layers]
    labels = np.asarray(categories)
    for reading in body["layers"][:seen]:
        layer = reading["layer"]
        by_hand = np.argsort(-cosine[:, layer, layer], kind="stable")[:5]
        assert [nb["id"] for nb in reading["neighbours"]] == [ids[i] for i in by_hand]
        np.testing.assert_allclose([nb["cosine"] for nb in reading["neighbours"]], cosine[by_hand, layer, layer],
                                   atol=1e-5)
        a, b = states[labels == "story", layer].mean(0), states[labels == "code", layer].mean(0)
        axis = np.dot(live[layer] - a, b - a) / np.dot(b - a, b - a)
        assert reading["axis_score"] == pytest.approx(axis, abs=1e-4)
        assert sum(reading["vote"].values()) == 5 and reading["winner"] in reading["vote"]
        probs = [entry["prob"] for entry in reading["lens"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert body["bifurcation"]["home"] in PROMPTS and "layer" in body["bifurcation"]["sentence"]
    assert body["tokens"] and body["seconds"] > 0


def test_a_stored_prompt_typed_live_lands_on_itself(client):
    text = PROMPTS["code"][1]
    body = client.post("/api/trace", json={"prompt": text, "category": "code"}).json()
    stored = client.get("/api/map").json()
    index = [p["text"] for p in stored["prompts"]].index(text)
    np.testing.assert_allclose(body["projection"], stored["projection"][index], atol=1e-4)
    np.testing.assert_allclose(body["depth"], stored["depth"][index], atol=1e-4)
    assert all(reading["neighbours"][0]["index"] == index for reading in body["layers"])
    assert all(reading["neighbours"][0]["cosine"] == pytest.approx(1.0, abs=1e-5) for reading in body["layers"])
    assert body["bifurcation"]["home"] == "code"


@pytest.mark.parametrize(("payload", "status", "words"), [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "x" * 2001}, 422, "at most 2000"),
    ({"prompt": "ok", "extra": 1}, 422, "extra"),
    ({"text": "ok"}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "ok", "category": "poetry"}, 422, "not in this run"),
    ({"prompt": "a " * 400}, 422, "tokens"),
])
def test_trace_refuses_bad_requests(client, payload, status, words):
    response = client.post("/api/trace", json=payload)
    assert response.status_code == status
    assert words in response.json()["detail"] and "\n" not in response.json()["detail"]


def test_prompts_over_the_token_limit_are_refused(client, monkeypatch):
    monkeypatch.setattr("tokentrail.explore.session.MAX_PROMPT_TOKENS", 4)
    response = client.post("/api/trace", json={"prompt": LIVE})
    assert response.status_code == 422 and "explore traces at most 4" in response.json()["detail"]


def test_oversized_and_malformed_bodies(client):
    big = json.dumps({"prompt": "x" * 70_000}).encode()
    assert client.post("/api/trace", content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunks():
        for _ in range(80):
            yield b"x" * 1024

    assert client.post("/api/trace", content=chunks(), headers={"content-type": "application/json"}).status_code == 413
    broken = client.post("/api/trace", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["detail"]


# --- steering -------------------------------------------------------------------------------------------------------


def test_steering_adds_the_category_direction_at_its_layer(client, session, run_dir):
    states, categories, _ = stored_states(run_dir)
    labels = np.asarray(categories)
    layer, alpha = 2, 0.5
    body = client.post("/api/steer", json={"prompt": LIVE, "layer": layer, "alpha": alpha, "source": "story",
                                           "target": "math", "max_new_tokens": 4}).json()
    base, steered = np.asarray(body["baseline"]["projection"]), np.asarray(body["steered"]["projection"])
    # Before the steered block nothing changes.
    np.testing.assert_allclose(steered[:layer], base[:layer], atol=1e-5)
    # At it, the last token's state moved by alpha x median norm x the unit centroid difference (by hand); the
    # projection is linear, so its image moved by that delta times the components.
    direction = states[labels == "math", layer].mean(0) - states[labels == "story", layer].mean(0)
    scale = np.median(np.linalg.norm(states[:, layer], axis=-1))
    delta = alpha * scale * direction / np.linalg.norm(direction)
    assert body["scale"] == pytest.approx(scale, rel=1e-5)
    components = session.fit.trajectory.components_
    np.testing.assert_allclose(steered[layer] - base[layer], delta @ components.T, atol=1e-3)
    assert "story -> math" in body["direction"]
    np.testing.assert_allclose(np.asarray(body["steered"]["depth"])[:layer], np.asarray(body["baseline"]["depth"])[:layer],
                               atol=1e-5)
    # The baseline trajectory is the live prompt's.
    live = client.post("/api/trace", json={"prompt": LIVE}).json()
    np.testing.assert_allclose(base, live["projection"], atol=1e-5)


def test_steering_with_alpha_zero_changes_nothing(client):
    body = client.post("/api/steer", json={"prompt": LIVE, "layer": 1, "alpha": 0.0, "source": "code",
                                           "target": "math", "position": "all", "max_new_tokens": 6}).json()
    assert body["steered"]["text"] == body["baseline"]["text"]
    np.testing.assert_allclose(body["steered"]["projection"], body["baseline"]["projection"], atol=1e-6)


def test_steering_with_a_vector_file_inside_the_run(client, session, run_dir):
    hidden = session.trace.hidden_size
    vector = np.zeros(hidden, dtype=np.float32)
    vector[0] = 1.0
    (run_dir / "vectors").mkdir(exist_ok=True)
    np.save(run_dir / "vectors" / "first-axis.npy", vector)
    assert "vectors/first-axis.npy" in client.get("/api/info").json()["vector_files"]
    body = client.post("/api/steer", json={"prompt": LIVE, "layer": 3, "alpha": 1.0,
                                           "vector_file": "vectors/first-axis.npy", "max_new_tokens": 2}).json()
    moved = np.asarray(body["steered"]["projection"]) - np.asarray(body["baseline"]["projection"])
    np.testing.assert_allclose(moved[3], body["scale"] * session.fit.trajectory.components_[:, 0], atol=1e-3)


@pytest.mark.parametrize(("payload", "words"), [
    ({"layer": 0, "alpha": 1, "source": "story", "target": "code"}, "greater than or equal to 1"),
    ({"layer": 99, "alpha": 1, "source": "story", "target": "code"}, "cannot be steered"),
    ({"layer": 1, "alpha": 1, "source": "story", "target": "poetry"}, "not in this run"),
    ({"layer": 1, "alpha": 1, "source": "story", "target": "story"}, "two categories"),
    ({"layer": 1, "alpha": 1, "source": "story"}, "two categories"),
    ({"layer": 1, "alpha": 1, "source": "story", "target": "code", "vector_file": "v.npy"}, "not both"),
    ({"layer": 1, "alpha": 1, "vector_file": "../../outside.npy"}, "outside the run directory"),
    ({"layer": 1, "alpha": 1, "vector_file": "run.json"}, "not a .npy"),
    ({"layer": 1, "alpha": 1e6, "source": "story", "target": "code"}, "less than or equal to 64"),
    ({"layer": 1, "alpha": 1, "source": "story", "target": "code", "position": "every"}, "position"),
    ({"layer": 1, "alpha": 1, "source": "story", "target": "code", "max_new_tokens": 500}, "max_new_tokens"),
])
def test_steer_refuses_bad_requests(client, payload, words):
    response = client.post("/api/steer", json={"prompt": LIVE, **payload})
    assert response.status_code == 422, response.json()
    assert words in response.json()["detail"]


# --- adding a prompt to the run -----------------------------------------------------------------------------------


def test_adding_a_live_prompt_to_the_run(tmp_path, run_dir, tiny_model_dir, hf):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    own = ExploreSession(copy)
    own.load_model()
    client = TestClient(create_app(own))
    text = "Therefore, Socrates is mortal. The king"
    response = client.post("/api/store", json={"prompt": text, "category": "story", "label": "added live"})
    assert response.status_code == 200, response.json()
    added = response.json()
    assert added["n_prompts"] == 10 and added["category"] == "story"
    assert client.get("/api/info").json()["n_prompts_in_run"] == 10
    run = json.loads((copy / "run.json").read_text())
    assert run["prompts"]["items"][-1] == {"id": added["id"], "text": text, "category": "story", "label": "added live"}
    assert run["model"]["spec"] == str(tiny_model_dir)  # the settings, not "a model in memory"
    # Stored by the store's rules: the states are the model's own, and every earlier prompt is still there.
    trace = tt.open_run(copy).trace
    assert len(trace) == 10 and trace.prompts[-1] == text
    np.testing.assert_allclose(trace.states[-1][:-1], hidden_states(hf, text), atol=1e-4)
    assert all(TraceStore.open(copy / "store").holds([p for texts in PROMPTS.values() for p in texts]))
    # The run's next analysis includes it.
    assert cli.main(["analyze", str(copy), "--permutations", "9"]) == 0
    assert added["id"] in (copy / "metrics" / "projection.csv").read_text()
    # Twice is refused, and so is a category name that a prompt file would refuse.
    again = client.post("/api/store", json={"prompt": text, "category": "story"})
    assert again.status_code == 409 and "already in the run" in again.json()["detail"]
    bad = client.post("/api/store", json={"prompt": "fresh text", "category": "bad\x1bcategory"})
    assert bad.status_code == 422 and len(json.loads((copy / "run.json").read_text())["prompts"]["items"]) == 10
    assert client.post("/api/store", json={"prompt": "no category"}).status_code == 422


# --- a run whose model cannot be used ------------------------------------------------------------------------------


def _with_model_spec(run_dir: Path, target: Path, spec: str) -> Path:
    shutil.copytree(run_dir, target)
    run = json.loads((target / "run.json").read_text())
    run["model"]["spec"] = spec
    (target / "run.json").write_text(json.dumps(run))
    return target


def test_a_run_whose_model_is_gone_opens_read_only(tmp_path, run_dir):
    copy = _with_model_spec(run_dir, tmp_path / "run", str(tmp_path / "no-such-model"))
    opened = ExploreSession(copy)
    opened.start_loading()
    assert opened.wait_for_model(60) is False
    client = TestClient(create_app(opened))
    info = client.get("/api/info").json()
    assert info["read_only"] is True and info["model_status"] == "unavailable" and info["model_problem"]
    assert client.get("/api/map").status_code == 200
    for path, payload in (("/api/trace", {"prompt": LIVE}),
                          ("/api/steer", {"prompt": LIVE, "layer": 1, "alpha": 1, "source": "story", "target": "code"}),
                          ("/api/store", {"prompt": LIVE, "category": "story"})):
        response = client.post(path, json=payload)
        assert response.status_code == 503 and response.json()["detail"].startswith("read-only")


def test_another_model_than_the_stores_is_refused(tmp_path, run_dir, tiny_tokenizer):
    from tests.conftest import tiny_model

    other = tmp_path / "other-model"
    tiny_model("llama", seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    opened = ExploreSession(_with_model_spec(run_dir, tmp_path / "run", str(other)))
    opened.load_model()
    assert opened.model_status == "unavailable" and "refusing to mix" in opened.model_problem


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(TokentrailError, match="not a tokentrail run"):
        ExploreSession(tmp_path)


# --- one model call at a time ------------------------------------------------------------------------------------


def test_gate_refuses_beyond_its_queue():
    gate = ModelGate(max_waiting=1)
    holding, release = threading.Event(), threading.Event()
    order: list[str] = []

    def hold():
        with gate.turn():
            holding.set()
            release.wait(5)
            order.append("first")

    def wait_in_line():
        with gate.turn():
            order.append("second")

    first = threading.Thread(target=hold)
    first.start()
    holding.wait(5)
    second = threading.Thread(target=wait_in_line)
    second.start()
    deadline = time.monotonic() + 5
    while gate.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ExploreBusy, match="busy"), gate.turn():
        pass
    release.set()
    first.join(5)
    second.join(5)
    assert order == ["first", "second"] and gate.waiting == 0 and not gate.running


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_twenty_concurrent_requests_on_a_real_server(session):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(session), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    prompts = [f"{LIVE} and {n} more" for n in range(20)]
    expected = {p: session.live_json(session.place(p))["projection"] for p in prompts[:3]}

    def ask(prompt: str) -> tuple[int, dict]:
        request = urllib.request.Request(f"{base}/api/trace", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"content-type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(ask, prompts))
        for prompt, (status, body) in zip(prompts, answers):
            assert status in (200, 503), body
            if status == 503:
                assert body["detail"].startswith("busy")
                continue
            assert body["prompt"] == prompt
            if prompt in expected:
                np.testing.assert_allclose(body["projection"], expected[prompt], atol=1e-6)
        assert sum(status == 200 for status, _ in answers) >= 9  # one running and the queue's eight at least
        with urllib.request.urlopen(f"{base}/api/info", timeout=10) as response:  # still serving
            assert json.loads(response.read())["busy"] is False
    finally:
        server.should_exit = True
        thread.join(10)
