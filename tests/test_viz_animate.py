"""The thought-evolution GIF: one frame per layer, steady timing, fixed size, growing trajectories."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageSequence

from tokentrail.viz import animate
from viz_fixtures import meta_fixture, result_fixture  # noqa: F401  (fixtures)


def _frames(path):
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        info = dict(gif.info)
        frames = [
            (f.info.get("duration"), f.size, np.asarray(f.convert("RGB")))
            for f in ImageSequence.Iterator(gif)
        ]
    return info, frames


def test_one_frame_per_layer_at_the_requested_rate(tmp_path, result, meta):
    path = animate.trajectory_gif(result, meta, tmp_path / "evolution.gif", fps=4)
    info, frames = _frames(path)
    assert len(frames) == len(result.layers)
    assert {duration for duration, _, _ in frames} == {250}
    assert {size for _, size, _ in frames} == {(900, 700)}
    assert info.get("loop") == 0  # loops forever


def test_trajectories_grow_from_frame_to_frame(tmp_path, result, meta):
    path = animate.trajectory_gif(result, meta, tmp_path / "evolution.gif", fps=10)
    _, frames = _frames(path)
    assert {duration for duration, _, _ in frames} == {100}
    ink = [int((pixels.min(axis=2) < 200).sum()) for _, _, pixels in frames]
    # More of each line is drawn as depth increases (the last frame adds the final-norm step).
    assert ink[-2] > ink[len(ink) // 2] > ink[0]
    assert not np.array_equal(frames[0][2], frames[1][2])


@pytest.mark.parametrize(("fps", "expected_ms"), [(3, 330), (2.5, 400), (50, 20)])
def test_frame_duration_is_the_nearest_gif_delay(fps, expected_ms):
    assert animate.frame_duration_ms(fps) == expected_ms
    assert abs(expected_ms - 1000 / fps) <= 5


@pytest.mark.parametrize("fps", [0, -1, 120])
def test_unusable_frame_rates_are_refused(tmp_path, result, meta, fps):
    with pytest.raises(ValueError, match="fps"):
        animate.trajectory_gif(result, meta, tmp_path / "x.gif", fps=fps)
    assert not (tmp_path / "x.gif").exists()
