"""The defense benchmark: attacks x architectures x defenses over seeds.

For every (dataset, architecture, attack, seed) the lab trains a model (`bdscan lab`),
then every defense scans it (`bdscan scan --method ...`) with only the defender's clean
bundle to steer it; the clean test set and the poisoned test set only measure. Writes a
Markdown section (tables, goals, the per-epoch AR/L1/L2 plot as SVG) and the raw rows.

    python benches/defense_grid.py --bin target/debug/bdscan --out-md grid.md \
        --svg docs/bench/ar_vs_l1_l2.svg [--quick] [--seeds 0 1 2] [--jobs 2]

Runs `--jobs` processes at once, each with one libtorch thread (on 2 cores two
single-threaded runs get more done than one two-threaded run).
"""
import argparse
import json
import os
import random
import statistics as st
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ANP_ITERATIONS = 300
# Images of each measuring bundle that every per-epoch trace entry reads (the engine's
# default, set explicitly so the plot's caption states what the runs used).
TRACE_SAMPLES = 500
# Purification epochs whose every optimizer step the traced runs also measure
# (`trace_step_epochs`): on these models most of a backdoor goes within the first two
# epochs, where counting whole epochs cannot tell the penalties apart.
TRACE_STEP_EPOCHS = 5

# Defenses: (label, method, extra config). The label is what the tables show.
OURS = "BS+AR (ours)"
DEFENSES = {
    OURS: ("benign_salience", {}),
    "FT": ("ft", {}),
    "FP": ("fp", {}),
    # The paper's 2,000 mask iterations take ~200 s per model on one core here; the grid
    # runs 300 (all other ANP settings are the paper's) to fit its time budget.
    "ANP": ("anp", {"anp": {"iterations": ANP_ITERATIONS}}),
    "CLP": ("clp", {}),
    "activation+AR": ("activation", {}),
    "BS+L1": ("benign_salience", {"regularizer": "l1"}),
    "BS+L2": ("benign_salience", {"regularizer": "l2"}),
}
BASELINES = [OURS, "FT", "FP", "ANP", "CLP"]
ABLATIONS = ["activation+AR", "BS+L1", "BS+L2"]
# The `kind` of the rows that measure a never-backdoored model on a backdoored model's
# poison bundle (see `never_backdoored`); every other row is a defense run.
NEVER_BACKDOORED = "never_backdoored"
# The defenses whose per-epoch traces the tables and the plot read.
TRACED = {OURS, "BS+L1", "BS+L2"}

MAIN = ("mnist", "vgg-bn")
MAIN_ATTACKS = ["none", "badnets", "blended", "trojan", "sig", "wanet", "dynamic", "badnets-a2a"]
# Where the ablations run: every backdoor on the main architecture (on the clean-label
# SIG and the all-to-all variant no shortcut target is found, so the suspects, their
# penalty and pattern unlearning do the work), and the colour dataset's BadNets, where a
# found target has to be unlearned from a VGG with easy benign classes.
ABLATED_CELLS = [(*MAIN, attack) for attack in MAIN_ATTACKS if attack != "none"] + [
    ("shapes", "vgg-bn", "badnets")]


def ablated(r):
    """Whether this row's model is one the ablations ran on."""
    return (r["dataset"], r["arch"], r["attack"]) in ABLATED_CELLS


def model_key(r):
    """The (dataset, arch, attack, seed) a row is about: what runs are paired by."""
    return (r["dataset"], r["arch"], r["attack"], r["seed"])


def backdoored(r):
    """Whether the row's model arrived backdoored enough to count (ASR before >= 50%)."""
    return r["asr_before"] is not None and r["asr_before"] >= 0.5


def describe_cells(cells):
    by_model = {}
    for dataset, arch, attack in cells:
        by_model.setdefault(f"{'MNIST' if dataset == 'mnist' else dataset} {arch.upper()}", []).append(attack)
    return "; ".join(f"{model}: {', '.join(attacks)}" for model, attacks in by_model.items())


def plan(quick):
    """[(dataset, arch, attack, defenses)]"""
    if quick:
        return [
            ("mnist", "vgg-bn", "badnets", [OURS, "FT", "FP", "ANP", "CLP", "BS+L1", "BS+L2"]),
            ("mnist", "vgg-bn", "blended", [OURS, "FT", "CLP"]),
            ("mnist", "vgg-bn", "none", [OURS]),
            ("shapes", "vgg-bn", "badnets", [OURS, "FT"]),
        ]
    # Every attack on the main architecture against every baseline; the other
    # architectures and the colour dataset against the baselines; the ablations on
    # ABLATED_CELLS.
    cells = [(*MAIN, attack, BASELINES) for attack in MAIN_ATTACKS]
    for dataset, arch, attacks in [
        ("mnist", "resnet", ["badnets"]),
        ("mnist", "cnn", ["badnets"]),
        # Clean shapes models too: their benign classes are easy to reach, which is
        # where a shortcut search could raise a false alarm.
        ("shapes", "vgg-bn", ["none", "badnets", "blended"]),
        ("shapes", "resnet", ["none", "badnets"]),
        ("shapes", "cnn", ["badnets"]),
    ]:
        cells += [(dataset, arch, attack, BASELINES) for attack in attacks]
    return [(d, a, atk, defenses + (ABLATIONS if (d, a, atk) in ABLATED_CELLS else []))
            for d, a, atk, defenses in cells]


def run(cmd, log):
    started = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    return proc.returncode, time.monotonic() - started


def train(args, dataset, arch, attack, seed):
    out = Path(args.work) / f"{dataset}-{arch}-{attack}-s{seed}"
    meta_path = out / "meta.json"
    if args.reuse and meta_path.exists():
        return json.loads(meta_path.read_text()), 0.0
    out.mkdir(parents=True, exist_ok=True)
    name, a2a = (attack[:-4], True) if attack.endswith("-a2a") else (attack, False)
    cmd = [args.bin, "lab", "--dataset", dataset, "--arch", arch, "--attack", name,
           "--seed", str(seed), "--threads", "1", "--out", str(out)]
    if a2a:
        cmd.append("--all-to-all")
    code, wall = run(cmd, out / "lab.log")
    if code != 0:
        raise SystemExit(f"lab failed ({code}): {' '.join(cmd)}\n{(out / 'lab.log').read_text()[-2000:]}")
    return json.loads(meta_path.read_text()), wall


def defend(args, dataset, arch, attack, seed, label, meta):
    model_dir = Path(args.work) / f"{dataset}-{arch}-{attack}-s{seed}"
    out = model_dir / "defenses" / label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
    out.mkdir(parents=True, exist_ok=True)
    method, extra = DEFENSES[label]
    # Only the plot and the epochs-to-5% goal read per-epoch traces (AR, L1 and L2 on the
    # ablated cells); elsewhere measuring 500 + 500 images after every epoch took about a
    # fifth of each run and changes no result (the final metrics use every image either way).
    traced = label in TRACED and (dataset, arch, attack) in ABLATED_CELLS
    trace = {"trace_samples": TRACE_SAMPLES, "trace_step_epochs": TRACE_STEP_EPOCHS} if traced else {"trace_samples": 0}
    (out / "config.json").write_text(json.dumps({**trace, **extra}))
    cmd = [args.bin, "scan", "--model", str(model_dir / "model.pt"),
           "--clean", str(model_dir / "clean.safetensors"),
           "--test", str(model_dir / "test.safetensors"),
           "--method", method, "--config", str(out / "config.json"),
           "--seed", str(seed), "--threads", "1", "--device", args.device,
           "--out", str(out / "purified.pt"), "--report", str(out / "report.json")]
    if (model_dir / "poison.safetensors").exists():
        cmd += ["--poison", str(model_dir / "poison.safetensors")]
        if not meta.get("all_to_all"):
            cmd += ["--target-label", str(meta["target"])]
    code, wall = run(cmd, out / "scan.log")
    if code != 0:
        return {"error": (out / "scan.log").read_text()[-600:], "wall": wall}
    report = json.loads((out / "report.json").read_text())
    b, a = report["metrics"]["before"], report["metrics"]["after"]
    removed = report.get("suspects_removed") or {}
    return {
        "acc_before": b["clean_acc"], "asr_before": b.get("asr"),
        "acc_after": a["clean_acc"], "asr_after": a.get("asr"), "ra_after": a.get("ra"),
        "der": report.get("der"), "wall": wall,
        # Our method and the activation ablation: the arriving model with its suspects
        # zeroed, before fine-tuning (held-out accuracy as it arrived, for the cost).
        "held_out_before": report["selection"]["held_out_acc"],
        "removed_held_out_acc": removed.get("held_out_acc"), "removed_asr": removed.get("asr"),
        "trace": [{k: t.get(k) for k in ("phase", "epoch", "at_epoch", "held_out_acc", "test_acc", "asr",
                                         "suspect_norm_ratio")}
                  for t in report.get("trace", [])],
    }


def never_backdoored(args, dataset, arch, attack, seed, meta):
    """The row measuring the never-backdoored (`none`) model of the same dataset,
    architecture and seed on this backdoored model's poison bundle: how often the
    trigger's image change alone lands in the target class, with no backdoor to remove.
    A scan with 0 fine-tuning epochs only measures."""
    model_dir = Path(args.work) / f"{dataset}-{arch}-{attack}-s{seed}"
    clean_dir = Path(args.work) / f"{dataset}-{arch}-none-s{seed}"
    out = model_dir / "never_backdoored"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [args.bin, "scan", "--model", str(clean_dir / "model.pt"),
           "--clean", str(clean_dir / "clean.safetensors"),
           "--test", str(model_dir / "test.safetensors"),
           "--poison", str(model_dir / "poison.safetensors"),
           "--method", "ft", "--epochs", "0", "--seed", str(seed), "--threads", "1",
           "--device", args.device,
           "--out", str(out / "unchanged.pt"), "--report", str(out / "report.json")]
    if not meta.get("all_to_all"):
        cmd += ["--target-label", str(meta["target"])]
    code, wall = run(cmd, out / "scan.log")
    row = {"kind": NEVER_BACKDOORED, "dataset": dataset, "arch": arch, "attack": attack, "seed": seed,
           "wall": wall}
    if code != 0:
        return {**row, "error": (out / "scan.log").read_text()[-600:]}
    before = json.loads((out / "report.json").read_text())["metrics"]["before"]
    return {**row, "asr": before["asr"], "clean_acc": before["clean_acc"]}


def measure_never_backdoored(args, models):
    """Trains (or, with `--reuse`, finds) the `none` model of each backdoored model's
    dataset, architecture and seed, and measures it on that model's poison bundle: the
    `never_backdoored` rows for `models` [(dataset, arch, attack, seed)], already trained."""
    clean = sorted({(d, a, "none", s) for d, a, _, s in models})
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda m: train(args, *m), clean))
    meta = lambda m: json.loads((Path(args.work) / f"{m[0]}-{m[1]}-{m[2]}-s{m[3]}" / "meta.json").read_text())
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(lambda m: never_backdoored(args, *m, meta(m)), models))


def split_rows(rows):
    """(defense runs, never-backdoored measurements) of a saved grid."""
    return ([r for r in rows if r.get("kind") != NEVER_BACKDOORED],
            [r for r in rows if r.get("kind") == NEVER_BACKDOORED])


def train_and_defend(args, models, labels):
    """For the development studies: trains `models` [(dataset, arch, attack, seed)], then
    runs every defense in `labels` on each, `args.jobs` at a time. The rows and the wall
    seconds, training included."""
    started = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        metas = dict(zip(models, pool.map(lambda m: train(args, *m)[0], models)))

    def one(run):
        (d, a, atk, s), label = run
        res = defend(args, d, a, atk, s, label, metas[(d, a, atk, s)])
        print(f"{d}/{a}/{atk}/s{s} {label}: "
              + (f"der {res['der']}" if "error" not in res else "ERROR"), file=sys.stderr, flush=True)
        return {"dataset": d, "arch": a, "attack": atk, "seed": s, "defense": label, **res}

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, [(m, label) for m in models for label in labels]))
    return rows, time.monotonic() - started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/bdscan")
    ap.add_argument("--work", default="target/bench-grid")
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--svg", required=True, help="where to write the AR/L1/L2 epoch plot")
    ap.add_argument("--svg-link", default=None, help="path of the SVG as linked from the Markdown")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="where the scans run (cpu or cuda:N); the lab always trains on the CPU")
    ap.add_argument("--reuse", action="store_true", help="reuse trained models in --work (development only)")
    ap.add_argument("--from-json", default=None,
                    help="only re-render the Markdown and plot from a saved --out-json (no runs)")
    ap.add_argument("--wall-minutes", type=float, default=None,
                    help="with --from-json: the total wall time of the run that produced it")
    args = ap.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        seeds = sorted({r["seed"] for r in split_rows(rows)[0]})
        write_markdown(args, rows, seeds, (args.wall_minutes or 0) * 60)
        write_svg(args.svg, rows)
        return
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    cells = plan(args.quick)
    started = time.monotonic()

    # Train all models first (in parallel), then run all defenses (in parallel).
    jobs = [(d, a, atk, s) for d, a, atk, _ in cells for s in seeds]
    metas = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for key, result in zip(jobs, pool.map(lambda j: train(args, *j), jobs)):
            metas[key] = result
            print(f"trained {key}: acc {result[0]['clean_acc']:.4f} asr {result[0].get('asr')} "
                  f"({result[1]:.1f}s)", file=sys.stderr, flush=True)
    # On the models every ablation runs on, what a model that never saw the trigger makes
    # of it: ASR up to that rate is no backdoor left behind. (--quick runs no such model.)
    every_ablation = {(d, a, atk) for d, a, atk, labels in cells if set(ABLATIONS) <= set(labels)}
    baselines = [(d, a, atk, s) for d, a, atk in ABLATED_CELLS for s in seeds
                 if (d, a, atk) in every_ablation and (d, a, atk, s) in metas
                 and (d, a, "none", s) in metas]
    with ThreadPoolExecutor(args.jobs) as pool:
        measured = list(pool.map(lambda m: never_backdoored(args, *m, metas[m][0]), baselines))
    runs = [(d, a, atk, s, label) for d, a, atk, labels in cells for s in seeds for label in labels]
    rows = []

    def one(r):
        d, a, atk, s, label = r
        res = defend(args, d, a, atk, s, label, metas[(d, a, atk, s)][0])
        print(f"{d}/{a}/{atk}/s{s} {label}: " + (
            f"acc {res['acc_after']:.4f} asr {res['asr_after']} der {res['der']} ({res['wall']:.1f}s)"
            if "error" not in res else f"ERROR {res['error'][-200:]}"), file=sys.stderr, flush=True)
        return {"dataset": d, "arch": a, "attack": atk, "seed": s, "defense": label,
                "train_wall": metas[(d, a, atk, s)][1], **res}

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, runs)) + measured
    total = time.monotonic() - started
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(rows, indent=1))
    write_markdown(args, rows, seeds, total)
    write_svg(args.svg, rows)


def mean_std(xs, scale=100.0, digits=2):
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{st.mean(xs):.{digits}f} ± {st.pstdev(xs):.{digits}f}"


def mean(xs):
    xs = [x for x in xs if x is not None]
    return st.mean(xs) if xs else None


def write_markdown(args, rows, seeds, total):
    rows, floors = split_rows(rows)
    ok = [r for r in rows if "error" not in r]
    failed = [r for r in rows + floors if "error" in r]
    floors = [r for r in floors if "error" not in r]
    lines = []
    say = lines.append
    say(f"Seeds {' '.join(map(str, seeds))}; {len(rows)} defense runs on "
        f"{len({(r['dataset'], r['arch'], r['attack'], r['seed']) for r in rows})} lab-trained models; "
        f"{args.jobs} runs at a time, 1 libtorch thread each; scans on "
        f"{args.device}; total wall time {total / 60:.1f} min (training included).")
    say("")
    say("C-Acc on the clean test set, ASR and RA on its triggered non-target images (all-to-all: "
        "each image's own target), DER = (max(0, ΔASR) − max(0, ΔC-Acc) + 1) / 2; mean ± std over "
        "seeds; wall = seconds per defense run (mean). Only the defender's clean bundle (400 "
        "images, 5% of the training set) steers any defense.")
    say("")
    say("| dataset | arch | attack | defense | C-Acc before | ASR before | C-Acc after | ASR after | RA after | DER | wall s |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    groups = {}
    for r in ok:
        groups.setdefault((r["dataset"], r["arch"], r["attack"], r["defense"]), []).append(r)
    for (d, a, atk, label), rs in groups.items():
        col = lambda k: [r[k] for r in rs]
        der = [r["der"] for r in rs if r["der"] is not None]
        say(f"| {d} | {a} | {atk} | {label} | {mean_std(col('acc_before'))} | {mean_std(col('asr_before'))} | "
            f"{mean_std(col('acc_after'))} | {mean_std(col('asr_after'))} | {mean_std(col('ra_after'))} | "
            f"{mean_std(der, 1.0, 4) if der else '–'} | {st.mean(col('wall')):.1f} |")
    if failed:
        say("")
        say("Runs that failed (kept as information):")
        say("")
        for r in failed:
            say(f"- {r['dataset']}/{r['arch']}/{r['attack']}/seed {r['seed']} {r.get('defense', 'never-backdoored model on its poison bundle')}: "
                f"`{r['error'].strip().splitlines()[-1] if r['error'].strip() else 'no output'}`")

    # Averages per defense over backdoored models whose ASR before defense is >= 50%.
    say("")
    say("### Averages per defense")
    say("")
    say("Over every (model, seed) whose ASR before defense is at least 50%; clean-model cost over the "
        "`none` (non-backdoored) models.")
    say("")
    say("| defense | runs | ASR after | C-Acc drop (pts) | DER | C-Acc drop on clean models (pts) | wall s |")
    say("|---|---|---|---|---|---|---|")
    averages = {}
    for label in DEFENSES:
        bd = [r for r in ok if r["defense"] == label and r["asr_before"] is not None and r["asr_before"] >= 0.5]
        clean = [r for r in ok if r["defense"] == label and r["attack"] == "none"]
        if not bd and not clean:
            continue
        asr = mean([r["asr_after"] for r in bd])
        drop = mean([(r["acc_before"] - r["acc_after"]) * 100 for r in bd])
        der = mean([r["der"] for r in bd])
        clean_drop = mean([(r["acc_before"] - r["acc_after"]) * 100 for r in clean])
        wall = mean([r["wall"] for r in bd + clean])
        averages[label] = (asr, drop, der, clean_drop, len(bd))
        f = lambda x, fmt: "–" if x is None else fmt.format(x)
        say(f"| {label} | {len(bd)} | {f(asr, '{:.2%}')} | {f(drop, '{:.2f}')} | {f(der, '{:.4f}')} | "
            f"{f(clean_drop, '{:.2f}')} | {f(wall, '{:.1f}')} |")
    # The ablations ran on fewer models than ours, so their rows above average other runs
    # than ours does: this row is ours on exactly the ablations' runs, the like-for-like
    # line to read them against.
    with_ablations = {model_key(r) for r in ok if r["defense"] in ABLATIONS}
    on_ablated = [r for r in ok if r["defense"] == OURS and model_key(r) in with_ablations and backdoored(r)]
    if on_ablated:
        asr = mean([r["asr_after"] for r in on_ablated])
        drop = mean([(r["acc_before"] - r["acc_after"]) * 100 for r in on_ablated])
        der = mean([r["der"] for r in on_ablated])
        wall = mean([r["wall"] for r in on_ablated])
        say(f"| {OURS}, on the ablations' models only | {len(on_ablated)} | {asr:.2%} | {drop:.2f} | "
            f"{der:.4f} | – | {wall:.1f} |")

    say("")
    say("### Goals (issue 3)")
    say("")
    ours = averages.get(OURS)
    if ours:
        asr, drop, der, clean_drop, _ = ours
        # Only defenses run on every (model, seed) ours ran on compete here; the ablations
        # ran on a subset and are compared on it below.
        runs_of = lambda label: {(r["dataset"], r["arch"], r["attack"], r["seed"])
                                 for r in ok if r["defense"] == label}
        best = max((v[2], k) for k, v in averages.items()
                   if v[2] is not None and runs_of(OURS) <= runs_of(k))
        check = lambda cond: "met" if cond else "**not met**"
        say(f"- ASR after ≤ 3%: {asr:.2%} — {check(asr <= 0.03)}")
        say(f"- C-Acc drop ≤ 1.5 pts: {drop:.2f} — {check(drop <= 1.5)}")
        say(f"- DER ≥ 0.97: {der:.4f} — {check(der >= 0.97)}")
        say(f"- best average DER of the defenses run on every model: best is {best[1]} ({best[0]:.4f}) — {check(best[1] == OURS)}")
        if clean_drop is not None:
            say(f"- ≤ 1 pt on non-backdoored models: {clean_drop:.2f} — {check(clean_drop <= 1.0)}")
    # The ablations ran on a subset of the models: compare every variant of our method
    # on exactly those runs.
    variants = [OURS] + ABLATIONS
    ran = {}
    for r in ok:
        ran.setdefault((r["dataset"], r["arch"], r["attack"], r["seed"]), set()).add(r["defense"])
    same = [r for r in ok if ablated(r)
            and set(variants) <= ran[(r["dataset"], r["arch"], r["attack"], r["seed"])]]
    subset = {}
    for label in variants:
        rs = [r for r in same if r["defense"] == label and r["asr_before"] is not None
              and r["asr_before"] >= 0.5]
        if rs:
            subset[label] = (mean([r["der"] for r in rs]), mean([r["asr_after"] for r in rs]),
                             mean([(r["acc_before"] - r["acc_after"]) * 100 for r in rs]), len(rs))
    if subset:
        top = max(v[0] for v in subset.values())
        gaps = {label: paired_gap(same, label) for label in ABLATIONS}
        verdict = "met" if subset.get(OURS, (0,))[0] >= top else "**not met**"
        # A lead whose paired interval contains zero is one the seed could reverse: the
        # mean meets the goal, the comparison does not show ours better.
        level = [label for label, gap in gaps.items() if gap and gap[1] <= 0]
        if verdict == "met" and level:
            runner_up = max((v[0], k) for k, v in subset.items() if k != OURS)
            verdict = (f"met on the mean, **within noise** (ours {subset[OURS][0]:.5f}, next "
                       f"{runner_up[1]} {runner_up[0]:.5f}; the paired interval against "
                       f"{', '.join(level)} contains zero)")
        say(f"- best average DER among our method and its ablations, on their shared runs: {verdict}")
        say("- on the runs where every ablation also ran (" + describe_cells(ABLATED_CELLS) +
            "; same models and seeds): " + "; ".join(
                f"{k} DER {v[0]:.4f}, ASR {v[1]:.2%}, drop {v[2]:.2f} pts ({v[3]} runs)"
                for k, v in subset.items()))
        for label in ABLATIONS:
            gap = gaps[label]
            if gap:
                diff, lo, hi, wins, n = gap
                asr_term, acc_term = der_terms_gap(same, label)
                say(f"  - {OURS} − {label}, paired by model and seed: DER {diff:+.4f} "
                    f"(95% bootstrap interval {lo:+.4f} to {hi:+.4f}); ours higher on {wins} of {n}; "
                    f"of the mean, ASR removed gives {asr_term:+.4f} and clean accuracy kept {acc_term:+.4f}")
    for line in left_to_remove(same, floors):
        say(line)
    for line in identification_alone(same):
        say(line)
    # Counted at each epoch's end, and (when the runs measured single steps) after every
    # step of the first epochs: the same question at the resolution the trace allows.
    for steps, how, digits in [(False, "measured at the end of each epoch", 1),
                               (True, "measured after every optimizer step of the first "
                                      f"{TRACE_STEP_EPOCHS} epochs, then at each epoch's end", 2)]:
        epochs = epochs_to_asr(rows, steps=steps)
        if not epochs:
            continue
        faster = epochs.get(OURS, (1e9,))[0] < min(epochs.get(k, (1e9,))[0] for k in ('BS+L1', 'BS+L2'))
        epoch_gaps = {label: epochs_gap(rows, label, steps=steps) for label in ("BS+L1", "BS+L2")}
        level = [label for label, gap in epoch_gaps.items() if gap and gap[2] >= 0]
        verdict = "met" if faster else "**not met**"
        if faster and level:
            verdict = f"met on the mean, **within noise** (the paired interval against {', '.join(level)} contains zero)"
        say(f"- epochs of purification until ASR < 5%, {how} (mean over the runs of the ablated "
            "models; runs that never got there count as the schedule length + 1): " +
            ", ".join(f"{k} {v[0]:.{digits}f} ({v[1]}/{v[2]} reached)" for k, v in epochs.items()) +
            f" — {verdict}")
        for label, gap in epoch_gaps.items():
            if gap:
                diff, lo, hi, fewer, n, more = gap
                say(f"  - AR − {label[3:]}, paired by model and seed: {diff:+.2f} epochs (95% bootstrap "
                    f"interval {lo:+.2f} to {hi:+.2f}); AR fewer on {fewer} of {n}, more on {more}")
    say("")
    link = args.svg_link or args.svg
    say(f"![ASR and clean accuracy per purification epoch: AR vs L1 vs L2]({link})")
    say("")
    say(f"[Plot]({link}): ASR on the poisoned test set and C-Acc on the clean test set after each "
        "purification epoch, AR against L1 and L2 (same suspects, schedule and seed), mean over the "
        "ablated models (" + describe_cells(ABLATED_CELLS) + ") and seeds. Per-epoch values are "
        f"measured on {TRACE_SAMPLES} images of each test bundle, every class in proportion (`trace_samples`); "
        "the runs no table or plot reads per epoch skip the trace (`trace_samples` 0, which changes "
        "no result).")
    Path(args.out_md).write_text("\n".join(lines) + "\n")


def left_to_remove(same, floors, variants=None):
    """Bullet lines: on the shared runs, each variant's ASR after (ours and its ablations
    unless `variants` says otherwise) against the rate at which a never-backdoored model of
    the same dataset, architecture and seed puts the same triggered images in the target
    class."""
    rate = {model_key(r): r["asr"] for r in floors}
    shared = [r for r in same if model_key(r) in rate and backdoored(r)]
    variants = [label for label in (variants or [OURS] + ABLATIONS)
                if any(r["defense"] == label for r in shared)]
    if not variants:
        return []
    order = {cell: i for i, cell in enumerate(ABLATED_CELLS)}
    measured = sorted({model_key(r) for r in shared}, key=lambda k: (order.get(k[:3], len(order)), k))
    floor = mean([rate[k] for k in measured])
    # The measured models by attack, in the order of ABLATED_CELLS.
    per_attack = {}
    for k in measured:
        per_attack.setdefault(k[2] if k[:2] == MAIN else f"{k[0]} {k[1].upper()} {k[2]}", []).append(k)
    # What a clean model does not explain: ASR after above the never-backdoored model's
    # rate on the same images, run by run (a run below it counts 0, so SIG's high rate
    # cannot hide a leftover elsewhere).
    excess = lambda r: max(0.0, r["asr_after"] - rate[model_key(r)])
    parts = []
    for label in variants:
        rs = [r for r in shared if r["defense"] == label]
        at_or_below = sum(r["asr_after"] <= rate[model_key(r)] for r in rs)
        parts.append(f"{label} {mean([r['asr_after'] for r in rs]):.2%}, excess "
                     f"{mean([excess(r) for r in rs]):.2%}, at or below the rate on {at_or_below} of {len(rs)}")
    lines = [f"- what was left to remove on those runs: the never-backdoored (`none`) model of the same "
             f"dataset, architecture and seed puts {floor:.2%} of the same triggered images in the target "
             f"class, with no backdoor at all (per attack: "
             + ", ".join(f"{name} {mean([rate[k] for k in keys]):.2%}" for name, keys in per_attack.items())
             + f"; {len(measured)} models). ASR after the defense, and its excess over that rate (run "
             "by run, max(0, ASR after − the rate): what a clean model does not explain), mean over "
             "the runs: " + "; ".join(parts)]
    by_attack = []
    for name, keys in per_attack.items():
        cells = [mean([excess(r) for r in shared if r["defense"] == label and model_key(r) in keys])
                 for label in variants]
        by_attack.append(f"{name} " + " / ".join(f"{x:.2%}" for x in cells))
    lines.append(f"  - excess per attack ({' / '.join(variants)}): " + "; ".join(by_attack))
    # How far apart the variants could be at all: DER with nothing left to remove, and the
    # best variant picked run by run (an oracle: the pick reads the poisoned test data).
    before = {model_key(r): r["asr_before"] for r in shared}
    ceiling = mean([(before[k] + 1) / 2 for k in measured])
    ceiling_at_rate = mean([(max(0.0, before[k] - rate[k]) + 1) / 2 for k in measured])
    der_of = {(model_key(r), r["defense"]): r["der"] for r in shared}
    oracle = mean([max(der_of[(k, label)] for label in variants if (k, label) in der_of) for k in measured])
    means = [mean([r["der"] for r in shared if r["defense"] == label]) for label in variants]
    lines.append(f"  - room left on those runs: mean DER with no clean accuracy lost would be {ceiling:.4f} "
                 f"with ASR after 0, and {ceiling_at_rate:.4f} with ASR after at the never-backdoored "
                 f"model's rate; the best of the {len(variants)} variants picked run by run (an oracle: the "
                 f"pick reads the poisoned test data) {oracle:.4f}; the variants' means span "
                 f"{min(means):.4f} to {max(means):.4f}")
    return lines


def identification_alone(same):
    """Bullet lines: what zeroing the suspects does before any fine-tuning, benign salience
    against activation ranking, on the backdoored runs both ran on."""
    by_run = {}
    for r in same:
        if r.get("removed_asr") is not None and r["asr_before"] is not None and r["asr_before"] >= 0.5:
            by_run.setdefault((r["dataset"], r["arch"], r["attack"], r["seed"]), {})[r["defense"]] = r
    runs = [v for v in by_run.values() if OURS in v and "activation+AR" in v]
    if not runs:
        return []
    lines = ["- identification alone (every suspect entry zeroed in the arriving model, before any "
             f"fine-tuning; measured on the whole poison bundle, {len(runs)} shared runs): mean ASR "
             f"{mean([v[OURS]['asr_before'] for v in runs]):.1%} as the models arrived"]
    for label in (OURS, "activation+AR"):
        rs = [v[label] for v in runs]
        lines.append(f"  - {label}: ASR {mean([r['removed_asr'] for r in rs]):.1%} with its suspects "
                     f"zeroed, held-out accuracy "
                     f"{mean([(r['held_out_before'] - r['removed_held_out_acc']) * 100 for r in rs]):.1f} pts "
                     f"lower; ASR after the full defense {mean([r['asr_after'] for r in rs]):.2%}")
    lower = sum(v[OURS]["removed_asr"] < v["activation+AR"]["removed_asr"] for v in runs)
    lines.append(f"  - benign salience's suspects took ASR lower than activation's on {lower} of {len(runs)}")
    return lines


def compared_per_epoch(r):
    """Whether a row counts in the per-epoch comparisons (the plot, epochs to ASR < 5%): a
    finished run on an ablated model whose ASR before defense is at least 50%."""
    return "error" not in r and ablated(r) and backdoored(r)


def purify_curves(rows, label, steps=False):
    """Mean ASR / test accuracy per purification epoch for one defense on the ablated models;
    with `steps`, after every step of the first `TRACE_STEP_EPOCHS` epochs instead (keyed
    by epochs of steps run; empty when the runs measured no steps)."""
    per_epoch = {}
    for r in rows:
        if r["defense"] != label or not compared_per_epoch(r):
            continue
        if steps and not any(t["phase"] == "purify_step" for t in r["trace"]):
            continue
        for t in r["trace"]:
            if steps and t["phase"] == "purify_step":
                at = t["at_epoch"]
            elif t["phase"] == "purify" and (not steps or t["epoch"] <= TRACE_STEP_EPOCHS):
                at = t["epoch"]
            else:
                continue
            slot = per_epoch.setdefault(at, ([], []))
            slot[0].append(t["asr"])
            slot[1].append(t.get("test_acc") if t.get("test_acc") is not None else t["held_out_acc"])
    return {e: (mean(a), mean(c)) for e, (a, c) in sorted(per_epoch.items())}


def bootstrap_mean(diffs, resamples):
    """The mean of `diffs` and a 95% percentile-bootstrap interval of it (fixed seed, so
    the file is reproducible)."""
    rng = random.Random(0)
    means = sorted(mean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return mean(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def paired_diffs(rows, label, value, ours=OURS):
    """`value(ours' row) − value(label's row)` for every backdoored (model, seed) both ran."""
    by_model = {}
    for r in rows:
        if backdoored(r):
            by_model.setdefault(model_key(r), {})[r["defense"]] = r
    return [value(d[ours]) - value(d[label]) for d in by_model.values() if ours in d and label in d]


def der_terms_gap(rows, label, ours=OURS):
    """`ours` minus `label` in DER's two terms, mean over the backdoored (model, seed) both
    ran: max(0, ΔASR) / 2 and −max(0, ΔC-Acc) / 2. They add up to the DER gap."""
    asr_term = lambda r: max(0.0, r["asr_before"] - r["asr_after"]) / 2
    acc_term = lambda r: -max(0.0, r["acc_before"] - r["acc_after"]) / 2
    return (mean(paired_diffs(rows, label, asr_term, ours)),
            mean(paired_diffs(rows, label, acc_term, ours)))


def paired_gap(rows, label, resamples=10000, ours=OURS):
    """`ours` minus `label` in DER over the backdoored (model, seed) both ran: mean, a 95%
    percentile-bootstrap interval of the mean (fixed seed, so the file is reproducible),
    and on how many runs `ours` came out higher."""
    diffs = paired_diffs(rows, label, lambda r: r["der"], ours)
    if not diffs:
        return None
    return (*bootstrap_mean(diffs, resamples), sum(d > 0 for d in diffs), len(diffs))


def first_epoch_below(trace, below=0.05, steps=False):
    """(the first purification epoch whose trace ASR is below `below`, whether it got
    there); a run that never does counts as the schedule length + 1. None without a
    purification trace (or, with `steps`, without step entries). With `steps` the
    entries measured after single steps count too, at the epochs of steps run when
    measured (1.4: two of five steps into epoch 2)."""
    purify = [t for t in trace if t["phase"] == "purify" and t["asr"] is not None]
    if not purify or (steps and not any(t["phase"] == "purify_step" for t in trace)):
        return None
    points = [t for t in trace if t["asr"] is not None and
              (t["phase"] == "purify" or (steps and t["phase"] == "purify_step"))]
    hit = next((t.get("at_epoch") or t["epoch"] for t in points if t["asr"] < below), None)
    return (hit, True) if hit is not None else (len(purify) + 1, False)


def epochs_gap(rows, label, below=0.05, resamples=10000, steps=False):
    """Ours minus `label` in epochs to ASR < `below`, paired by model and seed over the
    backdoored ablated runs both have a trace for: (mean, 2.5%, 97.5% bootstrap bounds,
    runs ours took fewer, runs, runs ours took more), or None. `steps` as in
    `first_epoch_below`."""
    firsts = {}
    for r in rows:
        if r["defense"] not in (OURS, label) or not compared_per_epoch(r):
            continue
        first = first_epoch_below(r["trace"], below, steps)
        if first is not None:
            firsts.setdefault((r["dataset"], r["arch"], r["attack"], r["seed"]), {})[r["defense"]] = first[0]
    diffs = [v[OURS] - v[label] for v in firsts.values() if len(v) == 2]
    if not diffs:
        return None
    return (*bootstrap_mean(diffs, resamples), sum(d < 0 for d in diffs), len(diffs),
            sum(d > 0 for d in diffs))


def epochs_to_asr(rows, below=0.05, steps=False):
    """Per variant, over the runs (model, seed) where AR, L1 and L2 all ran: (mean epochs
    to ASR < `below`, runs that got there, runs). `steps` as in `first_epoch_below`."""
    ran = {}
    for r in rows:
        if "error" not in r:
            ran.setdefault((r["dataset"], r["arch"], r["attack"], r["seed"]), set()).add(r["defense"])
    both = {k for k, v in ran.items() if {OURS, "BS+L1", "BS+L2"} <= v}
    rows = [r for r in rows if (r["dataset"], r["arch"], r["attack"], r["seed"]) in both]
    out = {}
    for label in (OURS, "BS+L1", "BS+L2"):
        firsts, reached, n = [], 0, 0
        for r in rows:
            if r["defense"] != label or not compared_per_epoch(r):
                continue
            first = first_epoch_below(r["trace"], below, steps)
            if first is None:
                continue
            n += 1
            reached += first[1]
            firsts.append(first[0])
        if firsts:
            out[label] = (st.mean(firsts), reached, n)
    return out


def write_svg(path, rows):
    rows, _ = split_rows(rows)
    labels = (OURS, "BS+L1", "BS+L2")
    curves = {label: purify_curves(rows, label) for label in labels}
    step_curves = {label: purify_curves(rows, label, steps=True) for label in labels}
    colours = {OURS: "#d62728", "BS+L1": "#1f77b4", "BS+L2": "#2ca02c"}
    # (title, value index, curves, last epoch on the axis, axis label): a third panel
    # zooms in on the first epochs when the runs measured every step there.
    max_epoch = max([max(c) for c in curves.values() if c] or [1])
    panels = [("ASR on poisoned test set (%)", 0, curves, max_epoch, "purification epoch"),
              ("C-Acc on clean test set (%)", 1, curves, max_epoch, "purification epoch")]
    if any(step_curves.values()):
        panels.append((f"ASR, first {TRACE_STEP_EPOCHS} epochs, every step (%)", 0, step_curves,
                       TRACE_STEP_EPOCHS, "purification epochs of steps run"))
    pad = 50
    width, height = (860 if len(panels) == 2 else 1260), 370
    panel_w = (width - (len(panels) + 1) * pad) / len(panels)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for p, (title, idx, curves, max_epoch, axis) in enumerate(panels):
        x0 = pad + p * (panel_w + pad)
        y0, y1 = 30, height - 70
        lo = 0.0
        hi = 100.0
        if idx == 1:
            vals = [v[1] * 100 for c in curves.values() for v in c.values() if v[1] is not None]
            lo = max(0.0, (min(vals) if vals else 0) - 2)
        sx = lambda e: x0 + (e / max_epoch) * panel_w
        sy = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)
        parts.append(f'<text x="{x0 + panel_w / 2}" y="18" text-anchor="middle">{title}</text>')
        parts.append(f'<rect x="{x0}" y="{y0}" width="{panel_w}" height="{y1 - y0}" fill="none" stroke="#999"/>')
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            parts.append(f'<text x="{x0 - 5}" y="{sy(v) + 4}" text-anchor="end">{v:.0f}</text>')
            parts.append(f'<line x1="{x0}" x2="{x0 + panel_w}" y1="{sy(v)}" y2="{sy(v)}" stroke="#eee"/>')
        for e in range(0, max_epoch + 1, max(1, max_epoch // 8)):
            parts.append(f'<text x="{sx(e)}" y="{y1 + 15}" text-anchor="middle">{e}</text>')
        parts.append(f'<text x="{x0 + panel_w / 2}" y="{y1 + 32}" text-anchor="middle">{axis}</text>')
        for label, curve in curves.items():
            pts = [(e, v[idx] * 100) for e, v in curve.items() if v[idx] is not None]
            if not pts:
                continue
            path_d = " ".join(f"{sx(e):.1f},{sy(v):.1f}" for e, v in pts)
            parts.append(f'<polyline fill="none" stroke="{colours[label]}" stroke-width="2" points="{path_d}"/>')
    for i, label in enumerate(labels):
        x = pad + 10 + i * 130
        parts.append(f'<line x1="{x}" x2="{x + 20}" y1="{height - 12}" y2="{height - 12}" stroke="{colours[label]}" stroke-width="3"/>')
        parts.append(f'<text x="{x + 25}" y="{height - 8}">{label}</text>')
    parts.append("</svg>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
