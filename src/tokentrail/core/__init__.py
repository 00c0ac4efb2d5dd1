"""The torch-free core: the data a run holds (`Trace`, `TraceOptions`) and nothing that needs a model.

Everything that reads a run without tracing (analysis, figures, report, info, export, project, a rerun that
traces nothing) builds on this package and the store, so it never imports torch or transformers.
"""
