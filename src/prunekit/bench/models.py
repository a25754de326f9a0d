"""The networks of the pruning papers reproduced here, for 28×28 single-channel images.

Layer names (``fc1``, ``conv1``, ...) follow Han et al. 2015 so per-layer keep ratios read the same
as the paper's tables.
"""

from __future__ import annotations

from torch import nn


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): fully connected 784-300-100-10 with ReLU, 266,610 parameters."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(self.fc2(self.fc1(x).relu()).relu())


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's MNIST example (the variant Han et al. 2015 prune): conv 20@5×5, max-pool 2,
    conv 50@5×5, max-pool 2, fc 500 with ReLU, fc 10; 431,080 parameters for 28×28 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(self.fc1(x.flatten(1)).relu())


#: name -> (factory, name of the output layer)
MODELS = {"lenet-300-100": (LeNet300100, "fc3"), "lenet-5": (LeNet5, "fc2")}
