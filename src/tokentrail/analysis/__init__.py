"""Pure analyses of traced trajectories (numpy in, numpy out; no files, no plots, no torch)."""

from tokentrail.analysis.bifurcation import bifurcation_layers, divergence_layers, prompt_bifurcation
from tokentrail.analysis.dynamics import category_summary, projected_dynamics, trajectory_dynamics
from tokentrail.analysis.pipeline import AnalysisOptions, AnalysisResult, analyze_states, default_axis
from tokentrail.analysis.projection import TrajectoryPCA, normalize_states, parse_layer_spec
from tokentrail.analysis.separation import axis_score, best_separation_layer, separation_by_layer
from tokentrail.analysis.transport import token_cosine_by_layer, wasserstein_by_layer

__all__ = [
    "AnalysisOptions",
    "AnalysisResult",
    "TrajectoryPCA",
    "analyze_states",
    "axis_score",
    "best_separation_layer",
    "bifurcation_layers",
    "category_summary",
    "default_axis",
    "divergence_layers",
    "normalize_states",
    "parse_layer_spec",
    "projected_dynamics",
    "prompt_bifurcation",
    "separation_by_layer",
    "token_cosine_by_layer",
    "trajectory_dynamics",
    "wasserstein_by_layer",
]
