"""Measurements that need forward passes of their own, beside the tracer's: the attention energy (`energy`) and
the growth of a small perturbation of the embedding (`perturbation`)."""
