"""A small convolutional network with BatchNorm for 8x8 grey images (the demo's digits): what the test suite exports
and trains. Export it with

    python -m hytrain_export python/examples/digits_cnn.py:DigitsCnn --input-shape 1,8,8 --out digits-cnn
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsCnn(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))
