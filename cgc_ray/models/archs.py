"""The architectures cgc-ray builds, by name (torch-free, so the spec can validate names before torch starts)."""

TORCHVISION_ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# a small ResNet for CPU demos: layer4 is 8 x 8 at 64 px (cgc_ray.models.resnet.SmallResNet)
ARCHS: tuple[str, ...] = TORCHVISION_ARCHS + ("resnet_small",)
