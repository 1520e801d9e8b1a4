"""Looking at trained models: ``evaluation`` (``cgc-ray evaluate``: top-1/5, CH by the authors' protocol,
IAUC, held-out CGC loss) and ``figures`` (``cgc-ray explain``: heatmap overlays and the paper's Figure 1)."""
