"""cgc-ray: Contrastive Grad-CAM Consistency (Pillai et al., CVPR 2022) as Ray-distributed experiments.

Importing the package imports nothing heavy; modules are imported where used.
"""

__version__ = "0.1.0"
