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


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, ctor in [("mnist_cnn_bn", MnistCnnBn), ("mnist_cnn", MnistCnn)]:
        torch.manual_seed(0)
        scripted = torch.jit.script(ctor())
        scripted.save(str(out / f"{name}.pt"))
        print(f"wrote {out / name}.pt")
    torch.jit.script(TinyMlp()).save(str(out / "tiny_mlp.pt"))
    print(f"wrote {out / 'tiny_mlp.pt'}")


if __name__ == "__main__":
    main(sys.argv[1])
