"""Trajectory dynamics against brute-force loops in plain Python."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokentrail.analysis.dynamics import category_summary, projected_dynamics, trajectory_dynamics


def norm(v) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in v))


def dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def test_full_space_dynamics_match_loops():
    rng = np.random.default_rng(0)
    states = np.cumsum(rng.normal(size=(4, 6, 5)), axis=1).astype(np.float32)
    dyn = trajectory_dynamics(states)
    assert dyn["step_size"].shape == (4, 5)
    assert dyn["norm"].shape == (4, 6)
    assert dyn["turning_angle"].shape == (4, 4)
    assert dyn["arc_length"].shape == (4,)
    for p in range(4):
        arc = 0.0
        curvature = 0.0
        for layer in range(5):
            h0, h1 = states[p, layer], states[p, layer + 1]
            step = [float(b) - float(a) for a, b in zip(h0, h1)]
            assert dyn["step_size"][p, layer] == pytest.approx(norm(step), rel=1e-9)
            assert dyn["relative_step"][p, layer] == pytest.approx(norm(step) / norm(h0), rel=1e-9)
            assert dyn["cosine_successive"][p, layer] == pytest.approx(dot(h0, h1) / (norm(h0) * norm(h1)), rel=1e-9)
            assert dyn["norm_growth"][p, layer] == pytest.approx(norm(h1) / norm(h0), rel=1e-9)
            arc += norm(step)
        for layer in range(4):
            d0 = [float(b) - float(a) for a, b in zip(states[p, layer], states[p, layer + 1])]
            d1 = [float(b) - float(a) for a, b in zip(states[p, layer + 1], states[p, layer + 2])]
            angle = math.acos(max(-1.0, min(1.0, dot(d0, d1) / (norm(d0) * norm(d1)))))
            assert dyn["turning_angle"][p, layer] == pytest.approx(angle, rel=1e-9, abs=1e-12)
            curvature += angle
        for layer in range(6):
            assert dyn["norm"][p, layer] == pytest.approx(norm(states[p, layer]), rel=1e-9)
        assert dyn["arc_length"][p] == pytest.approx(arc, rel=1e-9)
        assert dyn["total_curvature"][p] == pytest.approx(curvature, rel=1e-9)


def test_known_geometry_right_angle_and_straight_line():
    # A path that goes +x, +x, then +y: no turn, then a right-angle turn.
    path = np.array([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [3.0, 1.0]]])
    dyn = trajectory_dynamics(path)
    np.testing.assert_allclose(dyn["step_size"][0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(dyn["turning_angle"][0], [0.0, math.pi / 2], atol=1e-12)
    assert dyn["arc_length"][0] == pytest.approx(3.0)
    assert dyn["total_curvature"][0] == pytest.approx(math.pi / 2)
    np.testing.assert_allclose(dyn["norm_growth"][0], [2.0, 1.5, math.sqrt(10) / 3])


def test_divisions_by_zero_give_nan():
    # A zero state, then a repeated state (a zero step).
    path = np.array([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])
    dyn = trajectory_dynamics(path)
    assert np.isnan(dyn["relative_step"][0, 0])
    assert np.isnan(dyn["cosine_successive"][0, 0])
    assert np.isnan(dyn["norm_growth"][0, 0])
    assert np.isnan(dyn["turning_angle"][0]).all()  # every turn touches the zero step
    assert dyn["total_curvature"][0] == 0.0  # nan turns are skipped
    assert dyn["arc_length"][0] == pytest.approx(2.0)


def test_projected_dynamics_speed_and_velocity():
    projection = np.array([[[0.0, 0.0, 5.0], [1.0, 2.0, 5.0], [1.0, 3.0, 7.0], [3.0, 2.0, 7.0]]])
    projected = projected_dynamics(projection)
    np.testing.assert_allclose(projected["speed"][0], [math.sqrt(5), math.sqrt(5), math.sqrt(5)])
    velocity = projected["velocity_pc2_pc1"][0]
    assert velocity[0] == pytest.approx(2.0)
    assert np.isnan(velocity[1])  # dPC1 = 0
    assert velocity[2] == pytest.approx(-0.5)
    np.testing.assert_allclose(projected["heading"][0], [math.atan2(2, 1), math.pi / 2, math.atan2(-1, 2)])


def test_input_errors():
    with pytest.raises(ValueError, match="at least 2 layers"):
        trajectory_dynamics(np.zeros((2, 1, 3)))
    with pytest.raises(ValueError, match=r"\[prompts, layers, hidden\]"):
        trajectory_dynamics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="k>=2"):
        projected_dynamics(np.zeros((2, 3, 1)))


def test_category_summary_mean_and_std():
    values = np.array([[1.0, 2.0], [3.0, np.nan], [10.0, 10.0], [5.0, 4.0]])
    summary = category_summary(values, ["a", "a", "b", "a"])
    assert list(summary) == ["a", "b"]
    mean_a, std_a = summary["a"]
    np.testing.assert_allclose(mean_a, [3.0, 3.0])
    np.testing.assert_allclose(std_a, [math.sqrt(8 / 3), 1.0])
    np.testing.assert_allclose(summary["b"][0], [10.0, 10.0])
    np.testing.assert_allclose(summary["b"][1], [0.0, 0.0])
    all_nan = category_summary(np.array([[np.nan], [1.0]]), ["x", "y"])
    assert np.isnan(all_nan["x"][0]).all()
    with pytest.raises(ValueError, match="2 categories"):
        category_summary(values, ["a", "b"])
