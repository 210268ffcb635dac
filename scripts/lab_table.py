"""The README's Lab table: trains every (dataset, architecture, attack) it lists with
`bdscan lab --seed 0 --threads 1` and default settings, and prints the Markdown rows
(C-Acc on the clean test set, ASR on the poison set, training seconds from the lab's
own metadata).

    python scripts/lab_table.py --bin target/debug/bdscan [--jobs 2]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ATTACKS = ["none", "badnets", "badnets-a2a", "blended", "trojan", "sig", "wanet", "dynamic"]
MODELS = ([("mnist", "vgg-bn", a) for a in ATTACKS]
          + [("mnist", "resnet", "badnets"), ("mnist", "cnn", "badnets")]
          + [("shapes", "vgg-bn", a) for a in ATTACKS]
          + [("shapes", "resnet", "badnets"), ("shapes", "cnn", "badnets")])


def train(binary, work, dataset, arch, attack):
    out = Path(work) / f"{dataset}-{arch}-{attack}"
    name, a2a = (attack[:-4], True) if attack.endswith("-a2a") else (attack, False)
    cmd = [binary, "lab", "--dataset", dataset, "--arch", arch, "--attack", name,
           "--seed", "0", "--threads", "1", "--out", str(out)] + (["--all-to-all"] if a2a else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"lab failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return json.loads((out / "meta.json").read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/bdscan")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work, ThreadPoolExecutor(args.jobs) as pool:
        metas = list(pool.map(lambda m: train(args.bin, work, *m), MODELS))
    print("| dataset | arch | attack | C-Acc | ASR | train s |")
    print("|---|---|---|---|---|---|")
    for (dataset, arch, attack), meta in zip(MODELS, metas):
        label = "badnets, all-to-all" if attack == "badnets-a2a" else attack
        asr = "–" if meta["asr"] is None else f"{meta['asr'] * 100:.2f}%"
        print(f"| {dataset} | {arch} | {label} | {meta['clean_acc'] * 100:.2f}% | {asr} | "
              f"{meta['train_seconds']:.1f} |")


if __name__ == "__main__":
    main()
