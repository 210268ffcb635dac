"""Does the ablation comparison of BENCHMARKS.md hold on models the grid never saw?

The grid (defense_grid.py) compares our method with its ablations (activation ranking
instead of benign salience, L1 and L2 instead of AR) on 24 runs: the ablated cells at
seeds 0–2. This script runs the same four variants, through the same functions, on the
same cells at development seeds (103–105 by default; the grid uses 0–2 only), plus
controls the grid lacks (no penalty on the suspects, no unlearning terms, neither), and
writes the paired differences on these runs, the suspects' norm per
purification epoch under each penalty and, when the grid's saved runs are given, the
grid's variants on both sets pooled.

    python benches/ablation_dev.py --bin target/debug/bdscan --out-md BENCHMARKS-ablation-dev.md

About an hour on 2 cores (30 models to train, 24 of them backdoored; 240 scans and 24
measurements: 59 minutes with the models reused when last run).
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

# Controls the grid does not run, to show what each part adds: the same pipeline with
# no penalty on the suspects (they train like every other weight), without the
# unlearning terms (shortcut and pattern unlearning: identification, AR, distillation,
# augmentation, pruning and recovery remain; with AR, L1, L2 or no penalty), and with the
# suspects ranked by benign salience alone instead of relative to the shortcut.
NO_PENALTY = "BS, no penalty"
NO_UNLEARNING = "BS+AR, no unlearning"
NEITHER = "BS, no penalty, no unlearning"
# Suspects ranked by benign salience alone, not relative to the shortcut the search found.
CLEAN_RANKING = "BS+AR, clean ranking"
UNLEARNING_OFF = {"unlearn_weight": 0, "pattern_weight": 0}
grid.DEFENSES[NO_PENALTY] = ("benign_salience", {"regularizer": "none"})
grid.DEFENSES[NO_UNLEARNING] = ("benign_salience", UNLEARNING_OFF)
grid.DEFENSES[NEITHER] = ("benign_salience", {"regularizer": "none", **UNLEARNING_OFF})
grid.DEFENSES[CLEAN_RANKING] = ("benign_salience", {"shortcut_ranking": False})
# The other penalties without the unlearning terms: where the suspects' penalty does the
# removal, so its form can show.
L1_NO_UNLEARNING = "BS+L1, no unlearning"
L2_NO_UNLEARNING = "BS+L2, no unlearning"
grid.DEFENSES[L1_NO_UNLEARNING] = ("benign_salience", {"regularizer": "l1", **UNLEARNING_OFF})
grid.DEFENSES[L2_NO_UNLEARNING] = ("benign_salience", {"regularizer": "l2", **UNLEARNING_OFF})
CONTROLS = [NO_PENALTY, NO_UNLEARNING, L1_NO_UNLEARNING, L2_NO_UNLEARNING, NEITHER, CLEAN_RANKING]
VARIANTS = [grid.OURS] + grid.ABLATIONS + CONTROLS
GRID_VARIANTS = [grid.OURS] + grid.ABLATIONS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/bdscan")
    ap.add_argument("--work", default="target/ablation-dev")
    ap.add_argument("--seeds", type=int, nargs="+", default=[103, 104, 105])
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-json", default="benches/results/ablation_dev.json")
    ap.add_argument("--grid-json", default="benches/results/grid.json",
                    help="the grid's saved runs, pooled with these in the report (skipped if absent)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse trained models in --work")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                    help="run only these; the other variants' rows are kept from --out-json")
    ap.add_argument("--from-json", default=None,
                    help="only re-render the Markdown from a saved --out-json (no runs)")
    ap.add_argument("--wall-minutes", type=float, default=0.0,
                    help="with --from-json: the total wall time of the run that produced it")
    ap.add_argument("--runs-by", default=None,
                    help="with --from-json: the command and commit that made the runs, for the header")
    args = ap.parse_args()
    if any(s in (0, 1, 2) for s in args.seeds):
        raise SystemExit("seeds 0-2 are the grid's; this replication uses other seeds")
    args.device = "cpu"
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        write_markdown(args, rows, args.wall_minutes * 60)
        return
    models = [(d, a, atk, s) for d, a, atk in grid.ABLATED_CELLS for s in args.seeds]
    rows, total = grid.train_and_defend(args, models, args.variants)
    earlier_floors = []
    if Path(args.out_json).exists():
        earlier, earlier_floors = grid.split_rows(json.loads(Path(args.out_json).read_text()))
        earlier_floors = [r for r in earlier_floors if grid.model_key(r) in models]
        if set(args.variants) != set(VARIANTS):
            rows = [r for r in earlier if r["defense"] not in args.variants] + rows
    # Saved before the measurements below, whose failure must not lose the scans (the
    # earlier measurements are kept until new ones replace them).
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(rows + earlier_floors, indent=1))
    # What a model that never saw the trigger makes of it, on each of these models'
    # poison bundles: ASR up to that rate is no backdoor left behind.
    started = time.monotonic()
    floors = grid.measure_never_backdoored(args, models)
    total += time.monotonic() - started
    remeasured = {grid.model_key(r) for r in floors if "error" not in r}
    rows += [r for r in earlier_floors if "error" not in r and grid.model_key(r) not in remeasured] + floors
    Path(args.out_json).write_text(json.dumps(rows, indent=1))
    write_markdown(args, rows, total)


def shared(rows, variants):
    """The backdoored runs (ASR before ≥ 50%) on which every one of `variants` finished."""
    ran = {}
    for r in rows:
        if "error" not in r and r["asr_before"] is not None and r["asr_before"] >= 0.5:
            ran.setdefault((r["dataset"], r["arch"], r["attack"], r["seed"]), {})[r["defense"]] = r
    return [r for v in ran.values() if set(variants) <= set(v) for r in v.values() if r["defense"] in variants]


def summary_lines(rows, variants):
    lines = []
    runs = len({(r["dataset"], r["arch"], r["attack"], r["seed"]) for r in rows})
    lines.append("| variant | runs | DER | ASR after | C-Acc drop (pts) |")
    lines.append("|---|---|---|---|---|")
    for label in variants:
        rs = [r for r in rows if r["defense"] == label]
        lines.append(f"| {label} | {len(rs)} | {st.mean(r['der'] for r in rs):.4f} | "
                     f"{st.mean(r['asr_after'] for r in rs):.2%} | "
                     f"{st.mean((r['acc_before'] - r['acc_after']) * 100 for r in rs):.2f} |")
    lines.append("")
    for label in variants:
        gap = label != grid.OURS and grid.paired_gap(rows, label)
        if gap:
            diff, lo, hi, wins, n = gap
            lines.append(f"- {grid.OURS} − {label}, paired by model and seed: DER {diff:+.4f} "
                         f"(95% bootstrap interval {lo:+.4f} to {hi:+.4f}); ours higher on {wins} of {n}")
    best = max(variants, key=lambda label: st.mean(r["der"] for r in rows if r["defense"] == label))
    lines.append(f"- highest mean DER over these {runs} runs: {best}")
    # Only runs with a per-epoch ASR trace count (the grid traces AR, L1 and L2).
    traced = [r for r in rows if any(t.get("asr") is not None for t in r["trace"])]
    for steps, how in [(False, "at the end of each epoch"),
                       (True, f"after every step of the first {grid.TRACE_STEP_EPOCHS} epochs")]:
        epochs = grid.epochs_to_asr(traced, steps=steps)
        if epochs:
            lines.append(f"- epochs of purification until ASR < 5%, measured {how} (on the trace's "
                         "poisoned images; a run that never got there counts as the schedule "
                         "length + 1): "
                         + ", ".join(f"{k} {v[0]:.2f} ({v[1]}/{v[2]} reached)" for k, v in epochs.items()))
    return lines


def suspect_norm_lines(rows, epochs=(1, 2, 3, 5, 10)):
    """What each penalty does to the suspects themselves: their norm after purification
    epochs, relative to its start, and the first epoch it is below 5% of that."""
    lines = ["| variant | " + " | ".join(f"after epoch {e}" for e in epochs)
             + " | after the last | first epoch below 5% |",
             "|---|" + "---|" * (len(epochs) + 2)]
    for label in VARIANTS:
        curves = [[t["suspect_norm_ratio"] for t in r["trace"] if t["phase"] == "purify"]
                  for r in rows if r["defense"] == label]
        curves = [c for c in curves if c and all(x is not None for x in c)]
        if not curves:
            continue
        at = [st.mean(c[e - 1] for c in curves if len(c) >= e) for e in epochs]
        below = [next((i + 1 for i, x in enumerate(c) if x < 0.05), len(c) + 1) for c in curves]
        lines.append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in at)
                     + f" | {st.mean(c[-1] for c in curves):.3f} | {st.mean(below):.1f} |")
    return lines


def identification_lines(rows, variants):
    """What the suspects alone carry: ASR of the arriving model with every suspect entry
    zeroed (the report's `suspects_removed`), per variant, and the gap between the
    rankings paired by model."""
    lines = ["### Identification alone", "",
             "ASR on the whole poison bundle of the model as it arrived with every suspect entry "
             "zeroed, before any fine-tuning, and what that cost in held-out accuracy; mean over "
             "these runs, for the three rankings (every other variant shares ours' suspects).", "",
             "| ranking (variant) | ASR as arrived | ASR with the suspects zeroed | held-out cost (pts) |",
             "|---|---|---|---|"]
    removed = {}
    for label in [v for v in (grid.OURS, "activation+AR", CLEAN_RANKING) if v in variants]:
        rs = [r for r in rows if r["defense"] == label and r.get("removed_asr") is not None]
        if not rs:
            continue
        removed[label] = {(r["dataset"], r["arch"], r["attack"], r["seed"]): r["removed_asr"] for r in rs}
        lines.append(f"| {label} | {st.mean(r['asr_before'] for r in rs):.1%} | "
                     f"{st.mean(r['removed_asr'] for r in rs):.1%} | "
                     f"{st.mean((r['held_out_before'] - r['removed_held_out_acc']) * 100 for r in rs):.1f} |")
    if grid.OURS in removed and CLEAN_RANKING in removed:
        ours, clean = removed[grid.OURS], removed[CLEAN_RANKING]
        both = [k for k in ours if k in clean]
        lower = sum(ours[k] < clean[k] - 1e-9 for k in both)
        higher = sum(ours[k] > clean[k] + 1e-9 for k in both)
        lines.append("")
        lines.append(f"- ranked relative to the shortcut ({grid.OURS}) against benign salience alone "
                     f"({CLEAN_RANKING}): ASR with the suspects zeroed lower on {lower} of {len(both)} "
                     f"models, higher on {higher}, the same on the rest (no target found, so the same ranking)")
    return lines


def without_unlearning_lines(rows, variants):
    """The penalties compared where they do the removal: AR without the unlearning terms
    against L1, L2 and no penalty without them, paired by model."""
    others = [v for v in (L1_NO_UNLEARNING, L2_NO_UNLEARNING, NEITHER) if v in variants]
    if NO_UNLEARNING not in variants or not others:
        return []
    lines = ["", "### The penalties without the unlearning terms", "",
             "With shortcut and pattern unlearning off, what removes the backdoor is the "
             "penalty on the suspects (with distillation, augmented fine-tuning, pruning and "
             "recovery, the same for all).", ""]
    for label in others:
        gap = grid.paired_gap(rows, label, ours=NO_UNLEARNING)
        if gap:
            diff, lo, hi, wins, n = gap
            lines.append(f"- {NO_UNLEARNING} − {label}, paired by model and seed: DER {diff:+.4f} "
                         f"(95% bootstrap interval {lo:+.4f} to {hi:+.4f}); AR higher on {wins} of {n}")
    return lines


def write_markdown(args, rows, total):
    rows, floors = grid.split_rows(rows)
    failed_floors = [r for r in floors if "error" in r]
    floors = [r for r in floors if "error" not in r]
    # The variants these rows hold (a `--variants` run without earlier rows holds fewer).
    present = [v for v in VARIANTS if any(r["defense"] == v for r in rows)]
    mine = shared(rows, present)
    if not mine:
        raise SystemExit("no backdoored model on which every variant finished")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    seeds = sorted({r["seed"] for r in rows})
    lines = []
    say = lines.append
    say("# Ablations on development models")
    say("")
    made = (f"Runs by {args.runs_by or 'an earlier run'}; re-rendered from {args.from_json} at commit"
            if args.from_json
            else f"Produced by `{' '.join(['python', *sys.argv])}` (`make bench-ablation-dev` "
                 "runs it without `--reuse`) at commit")
    measurements = f" and {len(floors) + len(failed_floors)} never-backdoored measurements" if floors or failed_floors else ""
    say(f"{made} {commit} on {time.strftime('%Y-%m-%d', time.gmtime())}; machine: "
        f"{len(os.sched_getaffinity(0))} cores, {cpu}, CPU only; {len(rows)} scans{measurements}, {args.jobs} at a "
        f"time with one libtorch thread each; {total / 60:.1f} min in all"
        f"{' (models reused, their training not included)' if args.reuse else ' (training included)' if not args.from_json else ''}.")
    say("")
    say(f"The cells where `make bench` runs the ablations ({grid.describe_cells(grid.ABLATED_CELLS)}), "
        f"with lab seeds {', '.join(map(str, seeds))} instead of the grid's 0–2: the same lab "
        "commands, the same `bdscan scan` commands and configurations (each variant at its "
        "defaults but for `--method` or `regularizer`; the controls set `regularizer` `none`, "
        "`unlearn_weight` and `pattern_weight` 0 (with each penalty), or both, or "
        "`shortcut_ranking` false), the "
        "scan seed the model's. Only the "
        "defender's clean bundle steers any scan. DER = (max(0, ΔASR) − max(0, ΔC-Acc) + 1) / 2.")
    say("")
    say(f"## These runs ({len({(r['dataset'], r['attack'], r['seed']) for r in mine})} models)")
    say("")
    lines.extend(summary_lines(mine, present))
    say("")
    say("| model | seed | " + " | ".join(f"{v} DER" for v in present) + " |")
    say("|---|---|" + "---|" * len(present))
    by_model = {}
    for r in mine:
        by_model.setdefault((r["dataset"], r["arch"], r["attack"], r["seed"]), {})[r["defense"]] = r["der"]
    for (d, a, atk, s), ders in by_model.items():
        say(f"| {d} {a} {atk} | {s} | " + " | ".join(f"{ders[v]:.4f}" for v in present) + " |")
    say("")
    say("### The suspects' norm during purification")
    say("")
    say("The L2 norm of the suspect entries after each purification epoch over its value when "
        "purification started, mean over these runs (a run that never gets below 5% counts as "
        "the schedule length + 1). This is what the penalty acts on; DER is what it is for.")
    say("")
    lines.extend(suspect_norm_lines(mine))
    say("")
    floor_lines = grid.left_to_remove(mine, floors, variants=present)
    if floor_lines:
        say("### What was left to remove")
        say("")
        lines.extend(floor_lines)
        say("")
    lines.extend(identification_lines(mine, present))
    lines.extend(without_unlearning_lines(mine, present))
    grid_path = Path(args.grid_json)
    if grid_path.exists() and set(GRID_VARIANTS) <= set(present):
        grid_rows, grid_floors = grid.split_rows(json.loads(grid_path.read_text()))
        theirs = [r for r in shared(grid_rows, GRID_VARIANTS) if grid.ablated(r)]
        if theirs:
            say("")
            say(f"## Pooled with the grid's runs ({grid_path}, seeds 0–2)")
            say("")
            mine = [r for r in mine if r["defense"] in GRID_VARIANTS]
            lines.extend(summary_lines(mine + theirs, GRID_VARIANTS))
            # Only when both sets were measured: a line on one set's models would sit
            # under the pooled table as if it covered both.
            if floors and any("error" not in r for r in grid_floors):
                lines.extend(grid.left_to_remove(mine + theirs,
                                                 floors + [r for r in grid_floors if "error" not in r]))
    failed = [r for r in rows + failed_floors if "error" in r]
    if failed:
        say("")
        say("Failed runs: " + "; ".join(f"{r['attack']} s{r['seed']} "
                                        f"{r.get('defense', 'never-backdoored model on its poison bundle')}"
                                        for r in failed))
    Path(args.out_md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
