"""Synthetic analysis results for the viz tests, independent of the real analysis code.

The fake result has the fields of `tokentrail.analysis.pipeline.AnalysisResult`; the prompts include a
hostile one so that every renderer is exercised on untrusted text.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tokentrail.viz import FigureMeta

HOSTILE = "<script>alert(1)</script>"
CHROMIUM = Path("/usr/bin/chromium")

CATEGORIES = ["math", "code", "poetry", "logic"]
PER_CATEGORY = 3
N_RAW = 9  # layers 0..8, so L = 8
K = 3


def fake_result(
    n_categories: int = 4,
    per_category: int = PER_CATEGORY,
    n_raw: int = N_RAW,
    k: int = K,
    include_final: bool = True,
    with_separation: bool = True,
    seed: int = 0,
) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    n_prompts = n_categories * per_category
    n_layers = n_raw + (1 if include_final else 0)
    t = np.linspace(0.0, 1.0, n_raw)
    proj = np.zeros((n_prompts, n_layers, k))
    depth = np.zeros((n_prompts, n_raw, k))
    for i in range(n_prompts):
        c = i // per_category
        direction = -1.0 + 2.0 * c / max(1, n_categories - 1)
        wobble = rng.normal(0, 0.04, n_raw).cumsum()
        proj[i, :n_raw, 0] = 500 * t - 80 + rng.normal(0, 5, n_raw)
        proj[i, :n_raw, 1] = 200 * direction * t**1.3 + 30 * wobble + 12 * (i % per_category) * t
        if k > 2:
            proj[i, :n_raw, 2] = 40 * np.sin(3 * t + c) * t
        depth[i, :, 0] = direction * t**1.2 + 0.1 * wobble
        depth[i, :, 1] = 0.3 * np.cos(2 * t + i)
        if k > 2:
            depth[i, :, 2] = 0.1 * rng.normal(size=n_raw)
    if include_final:
        proj[:, -1] = proj[:, n_raw - 1] * 0.6 + np.array([60.0, 0.0, 0.0][:k])
    layers = np.arange(n_layers)

    step = rng.gamma(2.0, 1.0, (n_prompts, n_raw - 1)) * (1 + np.arange(n_raw - 1)) / n_raw
    dyn = {
        "step_size": step,
        "relative_step": step / 10,
        "cosine_successive": np.clip(0.7 + 0.3 * rng.random((n_prompts, n_raw - 1)), -1, 1),
        "norm": np.cumsum(rng.random((n_prompts, n_raw)), axis=1) + 1,
        "norm_growth": rng.random((n_prompts, n_raw - 1)),
        "turning_angle": rng.random((n_prompts, n_raw - 2)) * np.pi,
        "arc_length": step.sum(axis=1),
        "total_curvature": rng.random(n_prompts) * 5,
    }
    dproj = np.diff(proj[:, :, :2], axis=1)
    projected = {
        "speed": np.linalg.norm(dproj, axis=2),
        "velocity_pc2_pc1": dproj[:, :, 1] / dproj[:, :, 0],
    }
    separation = None
    if with_separation:
        separation = {
            "silhouette": np.linspace(-0.05, 0.6, n_raw),
            "knn_accuracy": np.linspace(0.3, 1.0, n_raw),
            "p_value": np.linspace(0.5, 0.001, n_raw),
            "chance": 1.0 / n_categories,
        }
    bif = np.full(n_prompts, -1)
    bif[0] = 3
    bif[per_category] = 2
    toward = [""] * n_prompts
    toward[0] = "code"
    return SimpleNamespace(
        layers=layers,
        projection=proj,
        explained_variance_ratio=np.array([0.55, 0.21, 0.07][:k]),
        depth_projection=depth,
        depth_explained_variance_ratio=np.array([0.31, 0.12, 0.05][:k]),
        dynamics=dyn,
        projected=projected,
        separation=separation,
        axis=("poetry", "code"),
        axis_score=depth[:, :, 0],
        bifurcation_layer=bif,
        bifurcation_toward=toward,
        divergence_layer=np.zeros((n_prompts, n_prompts), dtype=int),
        wasserstein=None,
        token_cosine=None,
        warnings=["synthetic data: nothing here is a model's"],
        summary={"n_prompts": n_prompts, "best_layer": 5, "note": HOSTILE},
    )


def fake_meta(
    result: SimpleNamespace,
    n_categories: int = 4,
    per_category: int = PER_CATEGORY,
    with_lens: bool = True,
    numbered: bool = True,
) -> FigureMeta:
    n_prompts = n_categories * per_category
    names = CATEGORIES + [f"cat{i}" for i in range(len(CATEGORIES), n_categories)]
    categories = [names[i // per_category] for i in range(n_prompts)]
    prompts = [f"prompt {i} about {categories[i]} costs $5 & more" for i in range(n_prompts)]
    prompts[1] = HOSTILE
    prompts[2] = 'quote " and <b>bold</b> and </script><img src=x onerror=alert(2)>'
    n_raw = np.asarray(result.depth_projection).shape[1]
    lens_tokens = lens_probs = None
    if with_lens:
        vocab = [" the", "\n", "<b>", " 42", "def", "$x$", "ünï", " a very long token"]
        lens_tokens = [[vocab[(i + j) % len(vocab)] for j in range(n_raw)] for i in range(n_prompts)]
        lens_tokens[1][-1] = HOSTILE
        lens_probs = np.linspace(0.02, 0.98, n_prompts * n_raw).reshape(n_prompts, n_raw)
    return FigureMeta(
        prompt_ids=[f"p{i:02d}" for i in range(n_prompts)],
        prompts=prompts,
        categories=categories,
        labels=[str(i + 1) if numbered else "" for i in range(n_prompts)],
        model_name="fake/TinyModel-8L",
        lens_tokens=lens_tokens,
        lens_probs=lens_probs,
    )


# Named *_fixture so that test modules can import them without their parameters shadowing an import.
@pytest.fixture(name="result")
def result_fixture() -> SimpleNamespace:
    return fake_result()


@pytest.fixture(name="meta")
def meta_fixture(result: SimpleNamespace) -> FigureMeta:
    return fake_meta(result)


# ---------------------------------------------------------------- headless Chromium over the DevTools pipe

# CI installs Chromium (`make browser`), so there a missing one fails the browser tests instead of skipping them.
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"),
                                    reason="needs /usr/bin/chromium (`make browser`)")


class DevToolsPipe:
    """A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe` (fd 3 in, fd 4 out).

    A pipe needs no port and no extra package, and unlike `--dump-dom` it reports console errors,
    exceptions, network requests and alert() dialogs as structured events.
    """

    def __init__(self, user_data_dir: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        # Chromium expects its pipe ends on fds 3 and 4. They are placed there in the child through fresh
        # duplicates, so neither dup2 can clobber the other end; set_inheritable is needed because a dup2 onto
        # the same number is a no-op that would leave close-on-exec set. close_fds=False keeps them (Python's
        # own descriptors are non-inheritable, so nothing else leaks into the browser).
        def remap() -> None:
            read_end, write_end = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-extensions",
                "--mute-audio",
                f"--user-data-dir={user_data_dir}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=remap,  # noqa: PLW1509 - the tests start no threads
            close_fds=False,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass

    def close(self) -> None:
        # A browser that already died needs no closing; the wait/kill below reaps it either way.
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def load_in_chromium(
    url: str,
    screenshot: Path | None = None,
    settle_s: float = 1.5,
    width: int = 1280,
    height: int = 2000,
    evaluate: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Open `url` in headless Chromium and report what happened.

    Returns the DOM, the visible text, the values of the `evaluate` expressions (run after the page settled),
    console errors, uncaught exceptions, error log entries, every requested URL and any alert() dialogs.
    """
    user_dir = Path(tempfile.mkdtemp(prefix="tokentrail-chromium-"))
    browser = DevToolsPipe(user_dir)
    expressions = {
        "dom": "document.documentElement.outerHTML",
        "text": "document.body.innerText",
        **(evaluate or {}),
    }
    values: dict[str, Any] = {}
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})
        session = browser.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        session_id = session["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session_id)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session_id,
        )
        browser.send("Page.navigate", {"url": url}, session=session_id)
        browser.wait_for("Page.loadEventFired", timeout=60)
        browser.pump(settle_s)  # plotly draws after the load event
        if any(e.get("method") == "Page.javascriptDialogOpening" for e in browser.events):
            # An open alert() blocks the page; dismiss it so the report of the failure can still be made.
            browser.send("Page.handleJavaScriptDialog", {"accept": True}, session=session_id)
        for name, expression in expressions.items():
            reply = browser.send(
                "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session_id
            )
            values[name] = reply["result"].get("value")
        if screenshot is not None:
            shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session_id)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
        shutil.rmtree(user_dir, ignore_errors=True)
    events = browser.events
    return {
        **values,
        "console_errors": [
            e["params"]
            for e in events
            if e.get("method") == "Runtime.consoleAPICalled"
            and e["params"].get("type") in ("error", "assert")
        ],
        "exceptions": [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"],
        "log_errors": [
            e["params"]["entry"]
            for e in events
            if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"
        ],
        "requests": [
            e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"
        ],
        "dialogs": [e["params"] for e in events if e.get("method") == "Page.javascriptDialogOpening"],
    }
