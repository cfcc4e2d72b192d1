"""Corpora and labelled tasks: specs, loading, token blocks, the built-in data sets, cleaning."""

from lmcompress.data import builtin  # noqa: F401  (registers the built-in data sets)
