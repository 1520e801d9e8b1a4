"""Classifiers, pretrained weights and checkpoints.

``archs``: the names (torch-free); ``resnet.build_model``: torchvision ResNets
and the small CPU ResNet; ``weights.load_weights``: pretrained initialisation;
``checkpoint``: the one reader and writer of every weights file.
"""

from cgc_ray.models.archs import ARCHS, TORCHVISION_ARCHS

__all__ = ["ARCHS", "TORCHVISION_ARCHS"]
