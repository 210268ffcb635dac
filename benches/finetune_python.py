"""Plain PyTorch fine-tuning loop: the reference for examples/finetune_bench.rs.

Same TorchScript model, same MNIST samples (the committed fixture), same batch size,
thread count, optimizer (SGD, momentum 0.9, weight decay 5e-4, lr 0.01) and per-epoch
shuffle. Prints one JSON line.

python benches/finetune_python.py MODEL.pt SAMPLES BATCH THREADS EPOCHS [DEVICE]
"""
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def main(model_path, samples, batch, threads, epochs, device="cpu"):
    torch.set_num_threads(threads)
    data = np.load("tests/fixtures/mnist10k.npz")
    images = torch.from_numpy(data["images"][:samples]).to(device)
    labels = torch.from_numpy(data["labels"][:samples]).to(device)
    model = torch.jit.load(model_path, map_location=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)

    def run(n_epochs):
        trained = 0
        start = time.perf_counter()
        for _ in range(n_epochs):
            model.train()
            order = torch.randperm(samples, generator=generator)
            for i in range(0, samples, batch):
                idx = order[i : i + batch]
                if len(idx) < 2:
                    continue
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                trained += len(idx)
        if images.is_cuda:
            torch.cuda.synchronize()
        return trained, time.perf_counter() - start

    run(1)  # warm-up
    trained, seconds = run(epochs)
    print(json.dumps({"impl": "PyTorch (Python)", "device": device, "threads": threads, "batch": batch, "samples": samples,
                      "epochs": epochs, "seconds": round(seconds, 3), "samples_per_second": round(trained / seconds, 1)}))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:6]), *sys.argv[6:7])
