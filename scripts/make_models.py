"""Write the TorchScript architectures that bdscan's tests and demo train and scan.

Each module takes one N x C x H x W tensor (uint8 pixels or float32 in [0, 1]) and
returns N x K logits; normalisation lives inside the model, as it would in a model a
user uploads. Weights are a seeded random initialisation: bdscan trains them itself
(`bdscan demo`, the test suite), so the archives stay small.

Activations: every architecture also exports `activations(x) -> Dict[str, Tensor]`, the
mean (over spatial positions) output of each hidden layer after its nonlinearity, shape
N x C, keyed by the module path of the layer whose weight produces those channels (the
names bdscan's layer grouping uses, e.g. `features.0`). TorchScript gives a host program
no forward hooks, so defenses that rank neurons by clean activation (Fine-Pruning, the
activation-magnitude ablation) read them through this method; models without it get a
clear error from those methods and work with every other one.

Usage: python scripts/make_models.py tests/fixtures/models
"""
import sys
from pathlib import Path
from typing import Dict

import torch
from torch import nn


class MnistInput(nn.Module):
    """uint8 or float pixels -> normalised float, so callers can send either."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) / 255.0
        else:
            x = x.to(torch.float32)
        return (x - 0.1307) / 0.3081


class MnistCnnBn(nn.Module):
    """VGG-style: two conv blocks with BatchNorm, then a two-layer classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.input = MnistInput()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.input(x)))

    @torch.jit.export
    def activations(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        h = self.input(x)
        h = self.features[2](self.features[1](self.features[0](h)))
        out["features.0"] = h.mean(dim=(2, 3))
        h = self.features[3](h)
        h = self.features[6](self.features[5](self.features[4](h)))
        out["features.4"] = h.mean(dim=(2, 3))
        h = self.features[7](h)
        h = self.classifier[2](self.classifier[1](self.classifier[0](h)))
        out["classifier.1"] = h
        return out


class MnistCnn(nn.Module):
    """The same shape without BatchNorm."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.input = MnistInput()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.input(x)))

    @torch.jit.export
    def activations(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        h = self.input(x)
        h = self.features[1](self.features[0](h))
        out["features.0"] = h.mean(dim=(2, 3))
        h = self.features[2](h)
        h = self.features[4](self.features[3](h))
        out["features.3"] = h.mean(dim=(2, 3))
        h = self.features[5](h)
        h = self.classifier[2](self.classifier[1](self.classifier[0](h)))
        out["classifier.1"] = h
        return out


class TinyMlp(nn.Module):
    """4 inputs -> 3 hidden ReLU units -> 2 classes, with weights set by hand so tests
    know the answer: hidden unit 2 has all-zero outgoing weights (nothing downstream
    reads it, so its benign salience must be exactly zero), units 0 and 1 drive the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
            self.hidden.bias.fill_(0.1)
            self.out.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]]))
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).flatten(1)
        return self.out(torch.relu(self.hidden(x)))

    @torch.jit.export
    def activations(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"hidden": torch.relu(self.hidden(x.to(torch.float32).flatten(1)))}


class ScaledInput(nn.Module):
    """uint8 or float pixels -> float in [0, 1] -> (x - mean) / std, the same for every channel."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) / 255.0
        else:
            x = x.to(torch.float32)
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """ResNet basic block. Registration order conv1, bn1, conv2, bn2, shortcut conv, shortcut
    bn: bdscan groups a BatchNorm with the conv registered right before it."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(x)[1]

    def pair(self, x: torch.Tensor):
        """(post-ReLU output of conv1, post-add output keyed by conv2)."""
        h = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))
        return h, out


class ResNet(nn.Module):
    """ResNet-style: a conv stem, two basic blocks (each halves the resolution), global
    average pooling and a linear classifier. BatchNorm everywhere."""

    def __init__(
        self, channels: int, mean: float, std: float, widths=(16, 32, 64), stem_stride: int = 1, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.input = ScaledInput(mean, std)
        # A stride-2 stem on 32x32 inputs keeps a CPU epoch short.
        self.conv1 = nn.Conv2d(channels, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = BasicBlock(widths[0], widths[1], 2)
        self.layer2 = BasicBlock(widths[1], widths[2], 2)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(self.input(x))))
        h = self.layer2(self.layer1(h))
        return self.fc(h.mean(dim=(2, 3)))

    @torch.jit.export
    def activations(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        h = torch.relu(self.bn1(self.conv1(self.input(x))))
        out["conv1"] = h.mean(dim=(2, 3))
        inner, h = self.layer1.pair(h)
        out["layer1.conv1"] = inner.mean(dim=(2, 3))
        out["layer1.conv2"] = h.mean(dim=(2, 3))
        inner, h = self.layer2.pair(h)
        out["layer2.conv1"] = inner.mean(dim=(2, 3))
        out["layer2.conv2"] = h.mean(dim=(2, 3))
        return out


class ShapesVggBn(nn.Module):
    """VGG-style for 3x32x32: three conv blocks (8, 16, 32 channels) with BatchNorm, then a
    two-layer classifier. Narrow so that a CPU epoch over 8,000 images takes a few seconds."""

    def __init__(self, num_classes: int = 10, batch_norm: bool = True) -> None:
        super().__init__()
        self.input = ScaledInput(0.5, 0.25)
        layers = []
        # Index of each ReLU in `features` -> module path of the conv that feeds it.
        self.relu_key: Dict[int, str] = {}
        cin = 3
        for cout in (8, 16, 32):
            conv_index = len(layers)
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            self.relu_key[len(layers)] = "features." + str(conv_index)
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.input(x)))

    @torch.jit.export
    def activations(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        h = self.input(x)
        i = 0
        for layer in self.features:
            h = layer(h)
            if i in self.relu_key:
                out[self.relu_key[i]] = h.mean(dim=(2, 3))
            i += 1
        h = self.classifier[2](self.classifier[1](self.classifier[0](h)))
        out["classifier.1"] = h
        return out


class ShapesCnn(ShapesVggBn):
    """The same shape without BatchNorm."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes, batch_norm=False)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    architectures = [
        ("mnist_cnn_bn", MnistCnnBn),
        ("mnist_cnn", MnistCnn),
        ("mnist_resnet", lambda: ResNet(1, 0.1307, 0.3081, widths=(16, 32, 32), stem_stride=2)),
        ("shapes_vgg_bn", ShapesVggBn),
        ("shapes_resnet", lambda: ResNet(3, 0.5, 0.25, stem_stride=2)),
        ("shapes_cnn", ShapesCnn),
    ]
    for name, ctor in architectures:
        torch.manual_seed(0)
        scripted = torch.jit.script(ctor())
        scripted.save(str(out / f"{name}.pt"))
        print(f"wrote {out / name}.pt")
    torch.jit.script(TinyMlp()).save(str(out / "tiny_mlp.pt"))
    print(f"wrote {out / 'tiny_mlp.pt'}")
    # The most common wrong model file: weights saved with torch.save, not TorchScript.
    torch.save(TinyMlp().state_dict(), str(out / "tiny_mlp_state_dict.pt"))
    print(f"wrote {out / 'tiny_mlp_state_dict.pt'}")


if __name__ == "__main__":
    main(sys.argv[1])
