"""Small BatchNorm networks with non-trivial running statistics, for synthesis tests
(importable as the `dsg` model source "tiny_models:tiny_bn_net")."""

import torch
from torch import nn


def tiny_bn_net(seed: int = 0) -> nn.Module:
    """Same weights on every call (the dataset manifest records the model's identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _tiny_bn_net(g)


def _tiny_bn_net(g: torch.Generator) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def no_bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


def fixed_size_net() -> nn.Module:
    """Accepts 3x12x12 images only (a Linear layer on the flattened feature map)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 12 * 12, 10)).eval()


def raising_constructor() -> nn.Module:
    """A model source whose own constructor fails."""
    raise RuntimeError("weights for this variant are not configured")


class _AssertsInputSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_bn_net()

    def forward(self, x):
        assert x.shape[-1] == 12, f"this network takes 12x12 images, got {tuple(x.shape)}"
        return self.body(x)


def asserting_forward_net() -> nn.Module:
    """Its forward asserts a 12x12 input (as many user models do)."""
    return _AssertsInputSize().eval()


class _SwitchesBnToTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_bn_net()

    def forward(self, x):
        self.body.train()  # a bug found in real code: the forward re-enables training mode
        return self.body(x)


def bn_training_net() -> nn.Module:
    """Its forward switches its BatchNorm layers to training mode."""
    return _SwitchesBnToTraining().eval()


def bias_free_net() -> nn.Module:
    """Convolutions and a Linear head without biases (bias correction must add them); same weights on every call."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5, bias=False))
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def residual_net() -> nn.Module:
    """torchvision ResNet-18 (residual adds, downsample branches, max pool) with non-trivial BN statistics."""
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1, 0.2)
                mod.bias.normal_(0, 0.2)
    return m


class _AuxHeadNet(nn.Module):
    """An auxiliary head (conv + BN) run only in training, as GoogLeNet's and Inception-v3's."""

    def __init__(self):
        super().__init__()
        self.body = tiny_bn_net()
        self.aux = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x):
        out = self.body(x)
        return (out, self.aux(x)) if self.training else out


def aux_head_net() -> nn.Module:
    """Its ``aux.1`` BatchNorm runs only in training mode; same weights on every call."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        return _AuxHeadNet().eval()


class _SqueezeExciteBn(nn.Module):
    """Squeeze-excite with a BatchNorm on the pooled 1x1 map (ReXNet's): it sees 1x1 at every input size."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.expand = nn.Conv2d(4, channels, 1)

    def forward(self, x):
        s = self.expand(torch.relu(self.bn(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * torch.sigmoid(s)


def se_bn_net() -> nn.Module:
    """tiny_bn_net with a squeeze-excite block whose BN (``1.bn``) sees 1x1 maps; same weights on every call."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        body = tiny_bn_net()
        se = _SqueezeExciteBn(8)
        with torch.no_grad():
            se.bn.running_mean.normal_(0, 0.5)
            se.bn.running_var.uniform_(0.5, 2.0)
        return nn.Sequential(body[:3], se, body[3:]).eval()
