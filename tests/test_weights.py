"""load_weights: SwAV key mapping, wrappers and prefixes, new heads, torchvision weights checked against their
published hash, and loud failures; nothing is downloaded."""
import hashlib
import os

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18, resnet50

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


def _hub_file(torch_home, obj, stem="resnet18"):
    """``obj`` saved into torch.hub's cache under ``torch_home``, named as torchvision names its files
    (``stem-<first 8 hex digits of its SHA-256>.pth``); returns the URL that names it."""
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / "tmp.pth"
    torch.save(obj, tmp)
    name = f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(cache / name)
    return f"https://download.invalid/models/{name}"


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache; a download fails the test (nothing is fetched)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail(f"downloaded {a}"))
    return tmp_path / "torch"


def test_torchvision_enum_name_reads_the_hub_cache_checked_against_its_hash(torch_home, monkeypatch):
    torch.manual_seed(2)
    src = resnet18()
    # the member's URL, pointed at a file whose published hash we can match (the real one needs the network)
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url", _hub_file(torch_home, src.state_dict()))
    model = resnet18(num_classes=5)
    report = load_weights(model, "ResNet18_Weights.IMAGENET1K_V1", arch="resnet18")
    assert report.source == "torchvision:ResNet18_Weights.IMAGENET1K_V1" and report.skipped == ("fc.bias", "fc.weight")
    _assert_trunk_equal(model, src.state_dict())
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        load_weights(model, "ResNet18_Weights.NOPE", arch="resnet18")


def test_a_tampered_file_in_the_hub_cache_is_refused(torch_home):
    """The file torchvision's URL names, but not the bytes it published: refused, not loaded, not downloaded."""
    name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]  # resnet18-f37072fd.pth
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(resnet18().state_dict(), torch_home / "hub" / "checkpoints" / name)
    with pytest.raises(ValueError, match=f"{name} does not match the hash published .* expected f37072fd"):
        load_weights(resnet18(), "ResNet18_Weights.IMAGENET1K_V1", arch="resnet18")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling without weights_only would create the marker folder
        return os.makedirs, (str(self.marker),)


def test_code_in_a_hub_file_never_runs_even_with_a_matching_hash(torch_home, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    url = _hub_file(torch_home, {"conv1.weight": torch.zeros(1), "x": _RunsCode(marker)})
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url", url)
    with pytest.raises(ValueError, match="refused by weights_only=True"):
        load_weights(resnet18(), "ResNet18_Weights.IMAGENET1K_V1", arch="resnet18")
    assert not marker.exists()
