"""Results: the per-trial Parquet rows (``table``), their statistics (``stats``), the aggregated Arrow table
(``summary``), the printed report (``report``) and plots (``plots``). pyarrow, scipy, rich and matplotlib:
no torch, no Ray, so ``cgc-ray report`` starts fast."""
