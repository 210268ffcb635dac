"""Is AR better than L1 and L2 once each penalty has its own best strength?

The grid (defense_grid.py) runs every penalty at the one default λ = 10. This sweep runs
AR, L1 and L2 at three strengths each (and the activation ablation at the default) on
development models: lab seeds 100 and up, which the grid never uses, on the cells where
no shortcut target is found (MNIST VGG-BN SIG and all-to-all BadNets: the suspects and
their penalty act alone) and on shapes VGG-BN BadNets. It writes a Markdown report with
the command, commit and machine, and every run as JSON.

    python benches/penalty_sweep.py --bin target/debug/bdscan --out-md BENCHMARKS-penalty-sweep.md

About 30 minutes on 2 cores (12 models to train, 120 scans).
"""
import argparse
import json
import os
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import defense_grid as grid  # noqa: E402

MODELS = ([("mnist", "vgg-bn", "sig", s) for s in range(100, 106)]
          + [("mnist", "vgg-bn", "badnets-a2a", s) for s in range(100, 103)]
          + [("shapes", "vgg-bn", "badnets", s) for s in range(103, 106)])
CELLS = {"SIG": ("mnist", "sig"), "all-to-all": ("mnist", "badnets-a2a"), "shapes BadNets": ("shapes", "badnets")}
# The default λ = 10 last in AR's list (the identification comparison uses it).
STRENGTHS = {"ar": [1, 3, 10], "l1": [3, 10, 30], "l2": [3, 10, 30]}
PENALTY_NAME = {"ar": "AR", "l1": "L1", "l2": "L2"}
ACTIVATION = "activation+AR λ=10"


def variants():
    out = {}
    for reg, strengths in STRENGTHS.items():
        for lam in strengths:
            out[f"BS+{PENALTY_NAME[reg]} λ={lam}"] = ("benign_salience", {"regularizer": reg, "reg_strength": lam})
    out[ACTIVATION] = ("activation", {})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/bdscan")
    ap.add_argument("--work", default="target/penalty-sweep")
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-json", default="benches/results/penalty_sweep.json")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse trained models in --work")
    ap.add_argument("--from-json", default=None,
                    help="only re-render the Markdown from a saved --out-json (no runs)")
    ap.add_argument("--wall-minutes", type=float, default=0.0,
                    help="with --from-json: the total wall time of the run that produced it")
    args = ap.parse_args()
    labels = variants()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        write_markdown(args, rows, labels, args.wall_minutes * 60)
        return
    grid.DEFENSES.update(labels)
    rows, total = grid.train_and_defend(args, MODELS, list(labels))
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(rows, indent=1))
    write_markdown(args, rows, labels, total)


def write_markdown(args, rows, labels, total):
    ok = [r for r in rows if "error" not in r]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    lines = []
    say = lines.append
    say("# Penalty strength sweep (development models)")
    say("")
    made = (f"Re-rendered from {args.from_json} (the runs' commit is in that file's history) at commit"
            if args.from_json else "Produced by `make bench-sweep` (benches/penalty_sweep.py) at commit")
    say(f"{made} {commit} on "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; machine: {len(os.sched_getaffinity(0))} "
        f"cores, {cpu}, CPU only; {len(rows)} scans on {len(MODELS)} lab models, {args.jobs} at a time "
        f"with one libtorch thread each; {total / 60:.1f} min in all (training included).")
    say("")
    say("Models: MNIST VGG-BN SIG (lab seeds 100–105) and all-to-all BadNets (100–102), shapes "
        "VGG-BN BadNets (103–105). The benchmark grid uses seeds 0–2 only, so none of these is in "
        "`BENCHMARKS.md`. Every scan is `bdscan scan` at its defaults but for the penalty and its "
        "strength λ (`regularizer`, `reg_strength`; the default is AR at λ = 10); the scan seed is "
        "the model's. DER, ASR after and C-Acc drop are means over all 12 models; per-cell columns "
        "are DER. Epochs: the first purification epoch whose trace ASR is below 5% "
        f"(on {grid.TRACE_SAMPLES} poisoned images, every class in proportion; never = schedule length + 1).")
    say("")
    say("| variant | " + " | ".join(f"{c} DER" for c in CELLS) + " | DER | ASR after | C-Acc drop (pts) | epochs to ASR < 5% |")
    say("|---|" + "---|" * (len(CELLS) + 4))
    summary = {}
    for label in labels:
        rs = [r for r in ok if r["defense"] == label]
        if not rs:
            continue
        cell = [st.mean([r["der"] for r in rs if (r["dataset"], r["attack"]) == key] or [float("nan")])
                for key in CELLS.values()]
        der = st.mean(r["der"] for r in rs)
        asr = st.mean(r["asr_after"] for r in rs)
        drop = st.mean((r["acc_before"] - r["acc_after"]) * 100 for r in rs)
        epochs = st.mean(grid.first_epoch_below(r["trace"])[0] for r in rs)
        summary[label] = der
        say(f"| {label} | " + " | ".join(f"{c:.4f}" for c in cell)
            + f" | {der:.4f} | {asr:.2%} | {drop:.2f} | {epochs:.2f} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        say("")
        say("Failed runs: " + "; ".join(f"{r['attack']} s{r['seed']} {r['defense']}" for r in failed))
    say("")
    say("### Each penalty at its best strength")
    say("")
    best = {}
    for name in PENALTY_NAME.values():
        candidates = [(summary[k], k) for k in summary if k.startswith(f"BS+{name} ")]
        if candidates:
            best[name] = max(candidates)[1]
    say("Best λ per penalty by mean DER over these runs (chosen on the same runs, so each penalty "
        "gets its own maximum): " + ", ".join(f"{k}: {v} ({summary[v]:.4f})" for k, v in best.items()) + ".")
    default = f"BS+AR λ={STRENGTHS['ar'][-1]}"
    gap = grid.paired_gap(ok, ACTIVATION, ours=default)
    if gap:
        diff, lo, hi, wins, n = gap
        say(f"- identification at the default penalty: {default} − {ACTIVATION}, paired by model: "
            f"DER {diff:+.4f} (95% bootstrap interval {lo:+.4f} to {hi:+.4f}); benign salience higher on {wins} of {n}")
    if "AR" in best:
        for other in ("L1", "L2"):
            if other not in best:
                continue
            gap = grid.paired_gap(ok, best[other], ours=best["AR"])
            if gap:
                diff, lo, hi, wins, n = gap
                say(f"- {best['AR']} − {best[other]}, paired by model: DER {diff:+.4f} "
                    f"(95% bootstrap interval {lo:+.4f} to {hi:+.4f}); AR higher on {wins} of {n}")
    Path(args.out_md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
