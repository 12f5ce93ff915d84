"""DeepLab-v2 / ResNet / FCDiscriminator: shapes, torchvision compatibility, weight loading,
parameter groups, BN freezing and the discriminator's layers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastst.checkpoint import checkpoint_state, save_checkpoint
from fastst.models import DeepLabV2, FCDiscriminator, deeplabv2
from fastst.models.resnet import build_resnet
from helpers import mismatch

# torchvision's published parameter counts (resnet18/34/50/101: 11,689,512 / 21,797,672 /
# 25,557,032 / 44,549,160) minus their fc layer (512*1000+1000 or 2048*1000+1000), and their
# parameter-tensor counts (62 / 110 / 161 / 314) minus fc's two: an independent check that our
# module tree is torchvision's.
TORCHVISION_BACKBONES = {
    "resnet18": (11_689_512 - 513_000, 60),
    "resnet34": (21_797_672 - 513_000, 108),
    "resnet50": (25_557_032 - 2_049_000, 159),
    "resnet101": (44_549_160 - 2_049_000, 312),
}


@pytest.fixture(scope="module")
def resnet101_model():
    torch.manual_seed(0)
    return deeplabv2(num_classes=19, backbone="resnet101")


def _small_model(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return deeplabv2(num_classes=num_classes, backbone="resnet18")


def _randomise_bn(model, seed=1):
    """Give every BatchNorm non-trivial statistics and affine values, so that loading or not
    loading them changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.1 * torch.randn(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(1 + torch.rand(n, generator=gen))
    return model


@pytest.mark.parametrize("backbone", sorted(TORCHVISION_BACKBONES))
def test_output_stride_8_shapes_all_backbones(backbone):
    # Meta tensors run the real shape arithmetic of every layer without computing anything.
    with torch.device("meta"):
        model = deeplabv2(num_classes=7, backbone=backbone)
        for h, w in [(321, 321), (65, 65), (97, 129), (512, 1024)]:
            out = model(torch.empty(2, 3, h, w))
            assert tuple(out.shape) == (2, 7, math.ceil(h / 8), math.ceil(w / 8))
        assert tuple(model(torch.empty(1, 3, 321, 321)).shape[-2:]) == (41, 41)


@pytest.mark.parametrize("backbone", sorted(TORCHVISION_BACKBONES))
def test_backbone_matches_torchvision_parameter_counts(backbone):
    with torch.device("meta"):
        resnet = build_resnet(backbone)
    numel, tensors = TORCHVISION_BACKBONES[backbone]
    params = list(resnet.parameters())
    assert sum(p.numel() for p in params) == numel
    assert len(params) == tensors


def test_resnet101_parameter_count_and_forward(resnet101_model):
    model = resnet101_model
    total = sum(p.numel() for p in model.parameters())
    head = 4 * (2048 * 19 * 9 + 19)
    assert total == TORCHVISION_BACKBONES["resnet101"][0] + head == 43_901_068
    assert 43.8e6 <= total <= 44.0e6
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 19, 9, 9)
    assert torch.isfinite(out).all()


def test_torchvision_key_names(resnet101_model):
    keys = set(resnet101_model.backbone.state_dict())
    for key in ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.num_batches_tracked", "layer3.22.conv3.weight",
                "layer4.2.bn3.bias"]:
        assert key in keys
    assert not any(k.startswith("fc.") for k in keys)
    basic = set(build_resnet("resnet18").state_dict())
    assert {"layer2.0.downsample.0.weight", "layer4.1.bn2.weight"} <= basic
    assert "layer1.0.conv3.weight" not in basic and "layer1.0.downsample.0.weight" not in basic


def test_dilation_semantics_bottleneck(resnet101_model):
    net = resnet101_model.backbone
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)
    assert net.layer3[0].conv2.dilation == (1, 1)
    assert all(net.layer3[i].conv2.dilation == (2, 2) for i in range(1, 23))
    assert net.layer4[0].conv2.dilation == (2, 2)
    assert net.layer4[1].conv2.dilation == (4, 4) and net.layer4[2].conv2.dilation == (4, 4)
    for layer in (net.layer3, net.layer4):
        for block in layer:
            assert block.conv2.stride == (1, 1)
            assert block.conv2.padding == block.conv2.dilation
    assert net.layer3[0].downsample[0].stride == (1, 1)


def test_dilation_semantics_basic_block():
    net = build_resnet("resnet18")
    expected = {("layer3", 0): 1, ("layer3", 1): 2, ("layer4", 0): 2, ("layer4", 1): 4}
    for (layer, index), d in expected.items():
        block = getattr(net, layer)[index]
        for conv in (block.conv1, block.conv2):
            assert conv.dilation == (d, d) and conv.padding == (d, d)
            assert conv.stride == (1, 1)
    assert net.layer2[0].conv1.stride == (2, 2)


def test_resnet18_real_forward_shapes_and_train_mode():
    model = _small_model()
    gen = torch.Generator().manual_seed(0)
    for h, w in [(65, 65), (97, 129), (33, 47)]:
        out = model(torch.randn(2, 3, h, w, generator=gen))
        assert out.shape == (2, 5, math.ceil(h / 8), math.ceil(w / 8))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_channels_last_and_bf16_autocast():
    model = _randomise_bn(_small_model()).eval()
    x = torch.randn(1, 3, 41, 57, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        channels_last = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x.contiguous(memory_format=torch.channels_last))
    assert channels_last.shape == reference.shape == (1, 5, 6, 8)
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)
    assert low.dtype == torch.bfloat16 and low.shape == reference.shape
    assert torch.isfinite(low).all()
    scale = reference.abs().max()
    assert (low.float() - reference).abs().max() < 0.1 * scale


def test_aspp_init_and_sum():
    model = _small_model(num_classes=19)
    convs = model.classifier.convs
    assert [c.dilation for c in convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert [c.padding for c in convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.01) < 5e-4 and abs(weights.mean().item()) < 5e-4
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    features = torch.randn(1, 512, 9, 11, generator=torch.Generator().manual_seed(0))
    expected = sum(F.conv2d(features, c.weight, c.bias, padding=c.padding, dilation=c.dilation)
                   for c in convs)
    torch.testing.assert_close(model.classifier(features), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="resnet101.*resnet18|resnet18.*resnet101"):
        deeplabv2(backbone="resnet152")
    with pytest.raises(ValueError, match="num_classes"):
        deeplabv2(num_classes=0, backbone="resnet18")
    model = _small_model()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        deeplabv2(backbone="resnet18", pretrained="/nonexistent/no_such_weights.pth")


def _torchvision_state(seed=3, with_num_batches_tracked=True):
    """A torchvision-format ResNet-18 ImageNet state_dict: backbone keys plus fc.*."""
    torch.manual_seed(seed)
    state = _randomise_bn(build_resnet("resnet18"), seed).state_dict()
    if not with_num_batches_tracked:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    gen = torch.Generator().manual_seed(seed)
    state["fc.weight"] = torch.randn(1000, 512, generator=gen)
    state["fc.bias"] = torch.randn(1000, generator=gen)
    return state


@pytest.mark.parametrize("with_num_batches_tracked", [True, False])
def test_load_torchvision_imagenet_state(tmp_path, with_num_batches_tracked):
    state = _torchvision_state(with_num_batches_tracked=with_num_batches_tracked)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    model = deeplabv2(num_classes=5, backbone="resnet18", pretrained=str(path))
    loaded = model.backbone.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(loaded[key], value), f"{key}: {mismatch(value, loaded[key])}"
    assert set(loaded) - set(state) <= {k for k in loaded if k.endswith("num_batches_tracked")}
    assert model.classifier.convs[0].weight.std().item() < 0.02


def test_fastst_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = _randomise_bn(_small_model(seed=4)).eval()
    x = torch.randn(1, 3, 41, 57, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    path = save_checkpoint(tmp_path / "ckpt.pt", checkpoint_state(model, iteration=7))
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    for pretrained in (str(path), plain, torch.load(path, weights_only=True)):
        other = deeplabv2(num_classes=5, backbone="resnet18", pretrained=pretrained).eval()
        with torch.no_grad():
            assert torch.equal(other(x), expected), mismatch(expected, other(x))


def test_wrapper_prefixes_are_stripped():
    model = _small_model(seed=5)
    wrapped = {"module." + k: v for k, v in model.state_dict().items()}
    other = deeplabv2(num_classes=5, backbone="resnet18", pretrained=wrapped)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)


def test_wrong_keys_listed_in_error(tmp_path):
    state = _torchvision_state()
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    del state["layer2.1.bn2.running_mean"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        deeplabv2(num_classes=5, backbone="resnet18", pretrained=path)
    message = str(info.value)
    assert "bad.pth" in message
    assert "2 missing keys" in message
    assert "layer1.0.conv1.weight" in message and "layer2.1.bn2.running_mean" in message
    assert "1 unexpected keys: layer9.0.conv1.weight" in message

    many = {f"head.{i}.weight": torch.zeros(1) for i in range(25)}
    with pytest.raises(ValueError, match=r"25 unexpected keys: .*\(15 more\)"):
        deeplabv2(num_classes=5, backbone="resnet18", pretrained=many)


def test_shape_mismatch_and_config_mismatch(tmp_path):
    source = _small_model(num_classes=5)
    with pytest.raises(ValueError, match=r"shape mismatches: classifier\.convs\.0\.weight: "
                                         r"file \(5, 512, 3, 3\) vs model \(7, 512, 3, 3\)"):
        deeplabv2(num_classes=7, backbone="resnet18", pretrained=source.state_dict())
    path = save_checkpoint(tmp_path / "c.pt", checkpoint_state(source))
    with pytest.raises(ValueError, match="load_model"):
        deeplabv2(num_classes=7, backbone="resnet18", pretrained=path)


def test_param_groups_cover_every_parameter_once():
    model = _small_model()
    groups = model.param_groups(2.5e-5, 2.5e-4)
    assert [g["lr"] for g in groups] == [2.5e-5, 2.5e-4]
    assert [g["name"] for g in groups] == ["backbone", "head"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.classifier.parameters()}
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [2.5e-5, 2.5e-4]
    for bad in (0, -1.0, float("nan"), float("inf"), "1e-3"):
        with pytest.raises(ValueError, match="backbone_lr"):
            model.param_groups(bad, 1e-4)
        with pytest.raises(ValueError, match="head_lr"):
            model.param_groups(1e-4, bad)


def test_freeze_bn_affine_keeps_running_stats_updating():
    model = _small_model()
    assert model.freeze_bn_affine() is model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20
    assert not any(p.requires_grad for m in bns for p in (m.weight, m.bias))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.requires_grad for m in convs)
    before = [m.running_mean.clone() for m in bns]
    model.train()
    model(torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert all(m.weight.grad is None and m.bias.grad is None for m in bns)
    assert all(m.weight.grad is not None for m in convs)
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    model.freeze_bn_affine(False)
    assert all(p.requires_grad for p in model.parameters())


def test_model_config():
    model = _small_model(num_classes=6)
    assert isinstance(model, DeepLabV2)
    assert model.model_config == {"num_classes": 6, "backbone": "resnet18"}


@pytest.mark.parametrize("first_kernel,size,expected", [(3, (64, 96), (2, 3)),
                                                        (4, (64, 96), (2, 3)),
                                                        (3, (95, 64), (3, 2)),
                                                        (4, (95, 64), (2, 2))])
def test_discriminator_shapes(first_kernel, size, expected):
    torch.manual_seed(0)
    disc = FCDiscriminator(19, ndf=8, first_kernel=first_kernel)
    x = torch.softmax(torch.randn(2, 19, *size), dim=1)
    out = disc(x)
    assert out.shape == (2, 1) + expected
    assert disc.conv1.kernel_size == (first_kernel, first_kernel)


def test_discriminator_layers_and_leaky_relu():
    torch.manual_seed(0)
    disc = FCDiscriminator(7)
    convs = [disc.conv1, disc.conv2, disc.conv3, disc.conv4, disc.classifier]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.kernel_size for c in convs] == [(3, 3)] + [(4, 4)] * 4
    assert all(c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    slopes = [m.negative_slope for m in disc.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2]
    x = torch.softmax(torch.randn(1, 7, 40, 48, generator=torch.Generator().manual_seed(1)), 1)
    expected = x
    for conv in convs[:-1]:
        expected = F.conv2d(expected, conv.weight, conv.bias, stride=2, padding=1)
        expected = F.leaky_relu(expected, 0.2)
    expected = F.conv2d(expected, disc.classifier.weight, disc.classifier.bias, stride=2, padding=1)
    torch.testing.assert_close(disc(x), expected)


def test_discriminator_bad_input():
    disc = FCDiscriminator(19, ndf=4)
    with pytest.raises(ValueError, match=r"\(B, 19, H, W\).*\(2, 16, 32, 32\)"):
        disc(torch.zeros(2, 16, 32, 32))
    with pytest.raises(ValueError, match="num_classes"):
        FCDiscriminator(0)
