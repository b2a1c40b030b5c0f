"""torchvision's ResNet-18 as it comes, for CIFAR-shaped inputs (3x32x32 images, 10 classes): the model
`cargo xtask bench`'s step part exports and trains beside PyTorch DDP, eager and `torch.compile`d. Export it with

    python -m hytrain_export python/examples/resnet18_cifar.py:build --input-shape 3,32,32 --out resnet18-export

and train the folder with `hytrain train --model resnet18-export ...`. Needs torchvision (`pip install
torchvision`) where you export, not where hytrain trains. `--check none` skips compiling the float64 twin that
proves the compiled step's gradients, which halves the export's time.
"""

import torch.nn as nn
import torchvision


def build(num_classes: int = 10) -> nn.Module:
    return torchvision.models.resnet18(num_classes=num_classes)
