"""Grad-CAM: closed form == autograd path, and == pytorch-grad-cam (an independent oracle)."""

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cgc_ray.method.cam import cam_and_logits, gradcam
from cgc_ray.models.resnet import build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("train_mode", [False, True])
def test_closed_form_equals_autograd_in_value_and_parameter_gradients(train_mode):
    model = build_model("resnet18", 10).train(train_mode)
    x = torch.randn(4, 3, 64, 64)
    t = torch.tensor([0, 3, 3, 9])
    grads = []
    maps = []
    for closed in (True, False):
        model.zero_grad()
        cam = gradcam(model, x, t, create_graph=True, closed_form=closed)
        loss = (cam.flatten(1) / (cam.flatten(1).norm(dim=1, keepdim=True) + 1e-6)).pow(3).sum()
        loss.backward()
        maps.append(cam.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-4, atol=1e-6)
    assert maps[0].abs().sum() > 0
    assert grads[0].keys() == grads[1].keys() and "conv1.weight" in grads[0] and "fc.weight" in grads[0]
    for n in grads[0]:
        scale = grads[0][n].abs().max().item()
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-4 * scale + 1e-8, msg=n)


def test_targets_default_to_top1_and_detach_without_create_graph():
    model = build_model("resnet_small", 7).eval()
    x = torch.randn(3, 3, 64, 64)
    cams, logits, targets = cam_and_logits(model, x)
    assert torch.equal(targets, logits.argmax(1))
    torch.testing.assert_close(cams, gradcam(model, x, logits.argmax(1)))
    assert not cams.requires_grad and cams.shape == (3, 8, 8)
    assert (cams >= 0).all()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_agrees_with_pytorch_grad_cam(arch):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = getattr(torchvision.models, arch)(num_classes=20).eval()
    x = torch.randn(2, 3, 96, 96)
    t = torch.tensor([4, 17])
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as oracle:
        ref = oracle(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
    for closed in (True, False):
        ours = gradcam(model, x, t, closed_form=closed).numpy()
        ours = scale_cam_image(scale_cam_image(ours, (96, 96)))
        np.testing.assert_allclose(ours, ref, atol=1e-5)


class TinyVGG(nn.Module):
    """conv -> ReLU(inplace) -> conv -> ReLU(inplace) -> pool -> flatten -> MLP head (no GAP shortcut)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_inplace_relu_after_hooked_layer_does_not_corrupt_cam():
    torch.manual_seed(1)
    safe = TinyVGG(inplace=False)
    unsafe = TinyVGG(inplace=True)
    unsafe.load_state_dict(safe.state_dict())
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 2, 4])
    # hand reference at features.2 (a conv followed by an in-place ReLU)
    A = safe.features[:3](x)
    A.retain_grad()
    out = safe.classifier(safe.features[3:](A))
    out.gather(1, t[:, None]).sum().backward()
    ref = torch.relu((A.grad.mean((2, 3), keepdim=True) * A).sum(1)).detach()
    assert (A.detach() < 0).any(), "the pre-ReLU activation must have negative values for this test to bite"
    for model in (safe, unsafe):
        torch.testing.assert_close(gradcam(model, x, t, layer="features.2"), ref, rtol=1e-5, atol=1e-6)
    # and differentiable parameter gradients agree as well
    g = []
    for model in (safe, unsafe):
        model.zero_grad()
        gradcam(model, x, t, layer="features.2", create_graph=True).pow(2).sum().backward()
        g.append(model.features[0].weight.grad.clone())
    torch.testing.assert_close(g[0], g[1])


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="layer='layer9'"):
        gradcam(build_model("resnet_small", 3), torch.randn(2, 3, 32, 32), layer="layer9")


def test_works_through_a_wrapper_and_for_copied_models():
    model = build_model("resnet_small", 4).eval()
    wrapped = nn.DataParallel(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(gradcam(wrapped, x, torch.tensor([1, 2])), gradcam(model, x, torch.tensor([1, 2])))
