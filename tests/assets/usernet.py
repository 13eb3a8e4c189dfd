"""A classifier "of the user's own" for the plug-in tests: a small residual network written as a
user would (nn.Sequential, inplace ReLU, a shortcut, functional flatten), not a dafar class."""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.short(x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes=10, c=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = Block(16, 32, 2)
        self.layer2 = Block(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def build():
    return TinyResNet()


class WithCustomLayer(nn.Module):
    """A layer type dafar cannot store."""

    class Scale(nn.Module):
        def forward(self, x):
            return x * 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.scale = self.Scale()
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.scale(self.conv(x)), 1))


def build_custom():
    return WithCustomLayer()
