"""The method, readable next to the paper: Grad-CAM ``cam``, the transform ``transforms`` (T), the contrastive
loss ``loss``, the CGC term ``cgc`` (L_CGC of a batch) and the metrics ``metrics`` (top-k, CH, IAUC).
torch only: no Ray, no pydantic, no rich."""
