"""load_weights: SwAV key mapping, wrappers and prefixes, new heads, and loud failures; nothing is downloaded."""
import pytest
import torch
from torchvision.models import WeightsEnum, resnet18, resnet50

from cgc_ray.models.weights import load_weights


def _trunk(sd):
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _assert_trunk_equal(model, reference_sd):
    got = model.state_dict()
    for k, v in _trunk(reference_sd).items():
        assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def swav_source():
    """A SwAV-layout checkpoint made from a random torchvision resnet50: "module." keys,
    projection head and prototypes, no fc."""
    torch.manual_seed(0)
    ref = resnet50().state_dict()
    for k, v in ref.items():  # make BN buffers differ from a fresh model's so equality is informative
        if k.endswith(("running_mean", "running_var")):
            v.uniform_(0.5, 1.5)
    ckpt = {f"module.{k}": v for k, v in _trunk(ref).items()}
    ckpt["module.projection_head.0.weight"] = torch.randn(16, 2048)
    ckpt["module.projection_head.0.bias"] = torch.randn(16)
    ckpt["module.prototypes.weight"] = torch.randn(30, 16)
    return ref, ckpt


def test_swav_checkpoint_maps_onto_torchvision_resnet50(tmp_path, swav_source):
    ref, ckpt = swav_source
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(ckpt, path)
    model = resnet50(num_classes=10)
    fc_before = model.fc.weight.clone()
    report = load_weights(model, f"swav:{path}", arch="resnet50")
    _assert_trunk_equal(model, ref)
    assert torch.equal(model.fc.weight, fc_before)  # no head in SwAV: the new head stays
    assert report.missing == ("fc.bias", "fc.weight")
    assert report.dropped == ("projection_head.0.bias", "projection_head.0.weight", "prototypes.weight")
    assert report.unexpected == () and report.loaded == len(_trunk(ref))


def test_missing_backbone_keys_raise_with_their_names(tmp_path, swav_source):
    _, ckpt = swav_source
    broken = {k: v for k, v in ckpt.items() if k != "module.layer4.2.conv3.weight"}
    torch.save(broken, tmp_path / "swav.pth")
    with pytest.raises(ValueError, match=r"1 backbone keys missing \(e.g. \['layer4.2.conv3.weight'\]\)"):
        load_weights(resnet50(), f"swav:{tmp_path / 'swav.pth'}", arch="resnet50")


def test_cgc_ray_checkpoint_with_module_prefix_and_a_different_head(tmp_path):
    torch.manual_seed(1)
    src = resnet18(num_classes=200)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd["module.extra_projection.weight"] = torch.zeros(2)
    torch.save({"model": sd, "epoch": 4, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "ckpt.pt")
    model = resnet18(num_classes=10)
    report = load_weights(model, str(tmp_path / "ckpt.pt"), arch="resnet18")
    _assert_trunk_equal(model, src.state_dict())
    assert report.skipped == ("fc.bias", "fc.weight") and report.missing == ("fc.bias", "fc.weight")
    assert report.unexpected == ("extra_projection.weight",)
    same_head = resnet18(num_classes=200)
    assert load_weights(same_head, str(tmp_path / "ckpt.pt"), arch="resnet18").missing == ()
    assert torch.equal(same_head.fc.weight, src.fc.weight)


def test_plain_state_dict_and_not_a_state_dict(tmp_path):
    src = resnet18()
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    model = resnet18()
    assert load_weights(model, str(tmp_path / "plain.pth"), arch="resnet18").missing == ()
    _assert_trunk_equal(model, src.state_dict())
    torch.save({"epoch": 3}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="junk.pth is not a state_dict"):
        load_weights(model, str(tmp_path / "junk.pth"), arch="resnet18")
    with pytest.raises(FileNotFoundError, match="nothere.pth does not exist"):
        load_weights(model, str(tmp_path / "nothere.pth"), arch="resnet18")


def test_wrong_architecture_is_refused(tmp_path):
    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="do not fit arch='resnet50'"):
        load_weights(resnet50(), str(tmp_path / "r18.pth"), arch="resnet50")
    with pytest.raises(ValueError, match="different architecture"):
        load_weights(resnet18(), "ResNet50_Weights.IMAGENET1K_V1", arch="resnet18")


def test_torchvision_enum_name_goes_through_get_state_dict(monkeypatch):
    torch.manual_seed(2)
    src = resnet18()
    seen = []

    def fake_get_state_dict(self, *args, **kwargs):  # stands in for the download
        seen.append(str(self))
        return src.state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    model = resnet18(num_classes=5)
    report = load_weights(model, "ResNet18_Weights.IMAGENET1K_V1", arch="resnet18")
    assert seen == ["ResNet18_Weights.IMAGENET1K_V1"]
    assert report.source == "torchvision:ResNet18_Weights.IMAGENET1K_V1" and report.skipped == ("fc.bias", "fc.weight")
    _assert_trunk_equal(model, src.state_dict())
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        load_weights(model, "ResNet18_Weights.NOPE", arch="resnet18")
