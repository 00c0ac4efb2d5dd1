"""Compare runs of one prompt set on several models, aligned by depth: `compare_runs(run_dirs, out_dir)`.

Models differ in depth and width, so everything here is put on a shared footing first:

* depth is normalised, layer / L (0 = embeddings, 1 = the last block's raw output), so a 30-layer and an
  18-layer model can be drawn on one axis;
* representations are compared through linear CKA (`tokentrail.analysis.similarity`), which works on the
  prompts' Gram matrices and so needs no shared hidden size; every CKA matrix comes with a permutation null
  (prompts shuffled on one side), because with ~20 prompts and hundreds of units unrelated representations
  already score well above 0; beside it, mutual k-nearest-neighbour alignment (the share of each prompt's k
  nearest prompts that both models agree on, with its chance level k/(n-1)), which that bias does not inflate;
* every run is analysed with the same options (kNN k, permutations, seed, sustain), so separation and
  bifurcation numbers differ only because the models do. Only the analyses the comparison needs are run
  (not the projections), straight from each run's store.

The seed's reading ("word problems sit nearer to stories than to math", "story < word problems < math/code"
along the natural-vs-formal direction) is checked with `axis_score`: on the line from the natural category's
centroid (0) to a formal category's centroid (1), where does the middle category's mean sit? The two ends are
0 and 1 by construction, so the tests are whether the middle lies strictly between them, below 0.5, and below
every formal category (the chain natural < middle < formal ends).

One concept per module; data flows one way, options -> alignment -> the analyses -> outputs -> pipeline:

    options       `CompareOptions`, shared by every run's analyses
    alignment     reading runs, matching their prompts and layers, `ModelRun`, consistency warnings
    separation    separation by normalised depth, per model
    similarity    linear CKA per pair of models with its null; variance carried by single dimensions
    bifurcation   bifurcation depths per prompt across models
    ordering      `ordering_plan`, the natural-vs-formal ordering and its verdicts, `verdict_sentences`
    outputs       `ComparisonResult`, CSV tables, the report page
    pipeline      `compare_runs`, which runs all of the above and writes compare.json

Output:
    OUT/compare.json      models, options, every summary number and verdict, warnings, file list
    OUT/tables/*.csv      separation by depth, CKA per pair, bifurcations, ordering
    OUT/figures/*.png|svg separation vs depth, CKA heat map per pair, ordering bars and ordering vs depth
    OUT/report.html       one offline page (the run report's machinery, prompt text escaped)
"""

from __future__ import annotations

from tokentrail.compare.alignment import ModelRun, load_model_runs
from tokentrail.compare.options import CompareOptions
from tokentrail.compare.ordering import ordering_plan, verdict_sentences
from tokentrail.compare.outputs import ComparisonResult
from tokentrail.compare.pipeline import compare_runs

__all__ = [
    "CompareOptions",
    "ComparisonResult",
    "ModelRun",
    "compare_runs",
    "load_model_runs",
    "ordering_plan",
    "verdict_sentences",
]
