"""Classifiers: torchvision ResNets with a new head, and a small ResNet for CPU demos."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, ResNet

from cgc_ray.models.archs import ARCHS


class SmallResNet(ResNet):
    """ResNet(BasicBlock, [1, 1, 1, 1]) with widths 16/32/64/128 for 64 px images.

    A 3x3 stride-2 stem, no max-pool, strides 1/2/2/1 in layer1..4: layer4 is
    8 x 8 at 64 px (a 4 x 4 CAM was too coarse for CGC in the pilots). It is a
    torchvision ``ResNet`` with the same module names, so the closed-form CAM,
    weight loading and any explainability tool treat it like resnet18.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int, int] = (16, 32, 64, 128)):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, widths[0], 1)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 1, stride=1)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build_model(arch: str, num_classes: int, *, weights: str | None = None) -> nn.Module:
    """A classifier by name with a head of ``num_classes``.

    weights: None (random init), a torchvision weight enum name such as
    "ResNet50_Weights.IMAGENET1K_V1" (torchvision downloads it when online), a
    local state_dict / cgc-ray checkpoint path, or "swav:PATH"; see
    ``cgc_ray.models.weights.load_weights``. A head whose shape differs is left new.
    """
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is not supported; choose one of {list(ARCHS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    model = SmallResNet(num_classes) if arch == "resnet_small" else tvm.get_model(arch, num_classes=num_classes)
    if weights:
        from cgc_ray.models.weights import load_weights

        load_weights(model, weights, arch=arch)
    return model
