"""Pre-training corpus cleaning: normalization, line and document filters, exact and near de-duplication,
streaming over several processes, with a report of what each filter removed.

    from lmcompress.data.cleaning import CleanConfig, clean_files
    report = clean_files(["corpus/"], "out/", CleanConfig(num_proc=2))
    report.stats.removed("near_dedup").documents_removed
"""

from lmcompress.data.cleaning.config import CleanConfig, load_clean_config

__all__ = ["CleanConfig", "clean_files", "clean_records", "load_clean_config"]


def __getattr__(name: str):
    # The pipeline imports datasketch (and through it scipy, ~1 s): `lmcompress clean --help` and code
    # that only reads a CleanConfig import this package without paying for it.
    if name in ("clean_files", "clean_records"):
        from lmcompress.data.cleaning import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
