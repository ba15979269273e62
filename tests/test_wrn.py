import pytest
import torch
import torch.nn.functional as F

from robustdiff.models.wrn import PRESETS, WideResNet, bn_parameter_names, build_wrn


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_wrn_28_10_parameter_count_and_key_layout():
    m = build_wrn("wrn-28-10", num_classes=10)
    assert n_params(m) == 36_479_194
    keys = set(m.state_dict())
    assert "init_conv.weight" in keys and "logits.weight" in keys and "logits.bias" in keys
    assert {"batchnorm.weight", "batchnorm.bias", "batchnorm.running_mean", "batchnorm.running_var"} <= keys
    for g in range(3):
        for i in range(4):
            for part in ("batchnorm_0", "conv_0", "batchnorm_1", "conv_1"):
                assert f"layer.{g}.block.{i}.{part}.weight" in keys
        # channels change only in the first block of each group: 16->160, 160->320, 320->640
        assert f"layer.{g}.block.0.shortcut.weight" in keys
        assert f"layer.{g}.block.1.shortcut.weight" not in keys
    assert not any(k.startswith(("mean", "std")) for k in keys), "mean/std must be non-persistent"
    assert n_params(build_wrn("wrn-70-16", num_classes=10)) == 266_796_506


def test_identity_shortcut_when_channels_equal():
    m = WideResNet(depth=10, width=1)
    assert m.layer[0].block[0].shortcut is None  # 16 -> 16
    assert m.layer[1].block[0].shortcut is not None


def test_tf_same_padding_shapes():
    m = WideResNet(depth=10, width=1, num_classes=10).eval()
    seen = {}

    def hook(name):
        def fn(mod, inp, out):
            seen[name] = (tuple(inp[0].shape[-2:]), tuple(out.shape[-2:]))
        return fn

    m.layer[0].block[0].conv_0.register_forward_hook(hook("s1"))
    m.layer[1].block[0].conv_0.register_forward_hook(hook("s2"))
    m(torch.rand(2, 3, 32, 32))
    assert seen["s1"] == ((34, 34), (32, 32))  # (1,1,1,1)
    assert seen["s2"] == ((33, 33), (16, 16))  # (0,1,0,1): right/bottom only
    # stride-2 SAME padding is asymmetric: the result must equal an explicit right/bottom pad
    blk = m.layer[1].block[0]
    x = torch.randn(1, 16, 32, 32)
    act = F.silu(blk.batchnorm_0(x))
    expected = F.conv2d(F.pad(act, (0, 1, 0, 1)), blk.conv_0.weight, stride=2)
    got = blk.conv_0(F.pad(act, blk._pad))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(expected, F.conv2d(act, blk.conv_0.weight, stride=2, padding=1))


def test_normalisation_inside_model_and_init():
    mean, std = (0.2860,), (0.3530,)
    m = WideResNet(depth=10, width=2, num_classes=10, in_channels=1, mean=mean, std=std)
    assert torch.allclose(m.mean.flatten(), torch.tensor(mean)) and torch.allclose(m.std.flatten(), torch.tensor(std))
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            assert mod.momentum == 0.01
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    assert torch.all(m.logits.bias == 0)
    w = m.layer[2].block[0].conv_1.weight  # 128 out channels, 3x3
    assert abs(w.std().item() - (2 / (9 * 128)) ** 0.5) < 0.1 * (2 / (9 * 128)) ** 0.5
    x = torch.rand(4, 1, 28, 28)
    assert m(x).shape == (4, 10)
    # The model normalises: feeding pre-normalised data is not the same thing.
    m.eval()
    assert not torch.allclose(m(x), m((x - 0.286) / 0.353))


def test_bn_parameter_names_and_presets():
    m = build_wrn("wrn-10-1")
    names = bn_parameter_names(m)
    assert "batchnorm.weight" in names and "layer.0.block.0.batchnorm_0.bias" in names
    assert not any("conv" in n or "logits" in n for n in names)
    assert {"wrn-28-10", "wrn-34-10", "wrn-70-16", "wrn-16-4", "wrn-10-2"} <= set(PRESETS)
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=12, width=1)
    with pytest.raises(ValueError, match="unknown WideResNet preset"):
        build_wrn("wrn-99-1")
