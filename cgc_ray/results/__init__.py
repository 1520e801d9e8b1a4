"""Results: the per-trial Parquet rows (``table``), their statistics (``stats``), the aggregated Arrow table
(``summary``), the printed report (``report``), plots (``plots``), the HTML page (``html``) and its notebook
face, :class:`Report` (``notebook``). pyarrow, scipy, rich and matplotlib: no torch, no Ray, so ``cgc-ray report``
starts fast."""

__all__ = ["Report"]


def __getattr__(name: str):
    # imported when asked for: the runner imports results.table, and needs neither the report nor matplotlib
    if name == "Report":
        from cgc_ray.results.notebook import Report

        return Report
    raise AttributeError(f"module 'cgc_ray.results' has no attribute {name!r}")
