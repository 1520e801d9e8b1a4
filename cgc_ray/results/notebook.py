"""A storage's results in a notebook: the report's tables as pandas DataFrames, and its HTML page.

::

    from cgc_ray.results import Report
    report = Report("results")            # a folder or a URI (s3://bucket/prefix); None: $CGC_RAY_STORAGE, ./results
    report.tables()["lambda_ablation"]    # the tables cgc-ray report prints, one DataFrame each
    report                                # in Jupyter: the page of cgc-ray report --format html

pandas is imported when a DataFrame is asked for (it comes with ray[tune]); no torch, no Ray.
"""

from __future__ import annotations

import html
import os
from typing import TYPE_CHECKING

from cgc_ray.config.paths import storage_location
from cgc_ray.results.html import render_html
from cgc_ray.results.labels import Layout
from cgc_ray.results.report import load, tables
from cgc_ray.results.summary import records

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Report"]

# The page in a notebook cell: an iframe, so that its styles do not restyle the notebook around it.
_FRAME_HEIGHT_PX = 900


class Report:
    """The results under ``storage``, read and analysed once (:func:`cgc_ray.results.report.load`).

    ``experiment``: only this one; ``layout``: force one of the report's layouts, as ``cgc-ray report --layout``.
    The rows left out (unreadable files) are listed in :attr:`left_out`.
    """

    def __init__(self, storage: str | os.PathLike | None = None, experiment: str | None = None, *,
                 layout: Layout | None = None):
        self.results = load(storage_location(None if storage is None else os.fspath(storage)), experiment)
        self.layout = layout

    def __repr__(self) -> str:
        return f"Report({self.results.storage!r}: {', '.join(self.experiments) or 'no finished trials'})"

    @property
    def experiments(self) -> list[str]:
        return self.results.experiments

    @property
    def left_out(self) -> list[str]:
        return self.results.left_out

    def tables(self) -> dict[str, list[pd.DataFrame]]:
        """Experiment -> its tables, as ``cgc-ray report`` prints them (cells are the printed text, e.g.
        ``53.00±3.61 (3)``); each DataFrame's ``attrs["title"]`` is its title."""
        import pandas as pd

        out = {}
        for name in self.experiments:
            out[name] = []
            for t in tables(self.results, name, layout=self.layout):
                frame = pd.DataFrame([[str(c) for c in row] for row in t.rows], columns=t.header)
                frame.attrs["title"] = t.title
                out[name].append(frame)
        return out

    def summary(self) -> pd.DataFrame:
        """The numbers behind the tables, one row per configuration (or paired difference) and metric: the
        columns of ``cgc-ray report --format json`` and of the Arrow summary (``results.summary``)."""
        import pandas as pd

        return pd.DataFrame(records(self.results.groups, self.results.paired))

    def html(self) -> str:
        """The page of ``cgc-ray report --format html``, without heatmaps (drawing them needs torch: use the
        command, or ``cgc_ray.explain.figures.report_heatmaps`` and :func:`cgc_ray.results.html.render_html`)."""
        return render_html(self.results, layout=self.layout)

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html(), quote=True)}" title="cgc-ray results" '
                f'style="width: 100%; height: {_FRAME_HEIGHT_PX}px; border: 1px solid #d9dee6"></iframe>')
