"""Compare PRIME with outcome-only RLOO: training reward, held-out accuracy and the implicit PRM's
fresh-batch accuracy per step (paper Fig. 3).

Run mode: for each seed, build the demo's toy task and tiny model, run SFT ONCE, then train every
method from that SFT checkpoint with the same seed and budget; by default PRIME
(``algorithm.estimator=prime_rloo``) and outcome-only RLOO (``algorithm.estimator=rloo``), or the
``--method LABEL=KEY=VALUE,KEY=VALUE`` given. Runs go to ``OUT/seed<S>/<label>/`` (logs in
``.../logs/scalars.jsonl``), then the plot and table are made from those logs.

    python tools/compare_runs.py --seeds 1 2 3 --steps 80 [--out outputs/compare] \\
        [--config examples/configs/tiny_cpu.yaml] [--override sft.steps=300 ...] \\
        [--method PRIME=algorithm.estimator=prime_rloo --method RLOO=algorithm.estimator=rloo \\
         --method official=algorithm.estimator=prime_official]

Read mode: plot runs that already exist. Each DIR is searched for ``scalars.jsonl`` files (a
training log dir, or a compare-runs output dir); runs this tool made are labelled by method and
seed, others by their path.

    python tools/compare_runs.py --read outputs/compare [more dirs ...] [--png compare.png]

The PNG has three panels: training reward (``outcome/accuracy_sampled``, the accuracy of every
response sampled in the step, before the filter), held-out greedy accuracy (``eval/accuracy``) and
the implicit PRM's accuracy on each fresh batch before it is updated on it (``prm/accuracy``: the
honest generalisation signal), one thin line per run and seed and, with several seeds, a bold mean
per method. The table gives, per run and seed and the mean per method: held-out accuracy before and
after, the training reward at the end, the PRM's fresh-batch accuracy over the last quarter, the
first step at which the run reaches the final training reward of the same seed's RLOO run, and the
mean over training of the fraction of responses whose advantage contradicts their outcome
(``advantage/flip_frac``, runs with process rewards).

``--task multistep`` runs the toy task's multi-step preset (a+b*c-d*e+f*g, every intermediate result
written out) instead of the demo's a+b*c.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field

from megatron_prime.data.toy import PRESETS as TOY_PRESETS

TRAIN_KEY = "outcome/accuracy_sampled"
EVAL_KEY = "eval/accuracy"
PRM_KEY = "prm/accuracy"
FLIP_KEY = "advantage/flip_frac"
RUN_INFO = "compare_run.json"  # written next to scalars.jsonl by run mode
BASELINE = "RLOO"
DEFAULT_METHODS = {"PRIME": ["algorithm.estimator=prime_rloo"], BASELINE: ["algorithm.estimator=rloo"]}
COLORS = {"PRIME": "tab:red", BASELINE: "tab:blue"}
MIN_STEPS_FOR_EFFICIENCY = 10


@dataclass
class Run:
    label: str  # method (or path for foreign runs)
    seed: int | None
    log_dir: str
    train: dict[int, float] = field(default_factory=dict)  # step -> training reward
    eval: dict[int, float] = field(default_factory=dict)  # step -> held-out accuracy
    prm: dict[int, float] = field(default_factory=dict)  # step -> PRM fresh-batch accuracy
    flip: dict[int, float] = field(default_factory=dict)  # step -> responses whose advantage contradicts the outcome


# ---- reading logs -----------------------------------------------------------------------------

def read_scalars(path: str) -> dict[int, dict]:
    """``scalars.jsonl`` -> {step: record}. A resumed run appends records for steps it had already
    logged: the last record of a step wins."""
    records: dict[int, dict] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{line_no}: not JSON, skipped (a run killed mid-write?)", file=sys.stderr)
                continue
            records[int(row["step"])] = row
    return records


def load_run(log_dir: str, label: str, seed: int | None) -> Run:
    records = read_scalars(os.path.join(log_dir, "scalars.jsonl"))
    run = Run(label, seed, log_dir)
    # The trainer logs step s's metrics at s + 1 (= updates done); step 0 is the evaluation before
    # training and the final evaluation is in the last step's record.
    for step, row in records.items():
        for key, curve in ((TRAIN_KEY, run.train), (EVAL_KEY, run.eval), (PRM_KEY, run.prm), (FLIP_KEY, run.flip)):
            if key in row:
                curve[step] = float(row[key])
    return run


def find_runs(dirs: list[str]) -> list[Run]:
    runs = []
    for top in dirs:
        if not os.path.isdir(top):
            raise SystemExit(f"error: {top}: not a directory")
        found = sorted(root for root, _, files in os.walk(top) if "scalars.jsonl" in files)
        if not found:
            raise SystemExit(f"error: {top}: no scalars.jsonl below it (not a training log dir?)")
        for log_dir in found:
            info_path = os.path.join(log_dir, RUN_INFO)
            if os.path.exists(info_path):
                with open(info_path) as f:
                    info = json.load(f)
                runs.append(load_run(log_dir, info["method"], info.get("seed")))
            else:
                rel = os.path.relpath(log_dir, os.path.dirname(os.path.abspath(top)))
                runs.append(load_run(log_dir, rel, None))
    return runs


# ---- running ----------------------------------------------------------------------------------

def run_comparison(args: argparse.Namespace) -> list[str]:
    """SFT once per seed, then a PRIME and an RLOO run from it. Returns the seed dirs."""
    from megatron_prime.config import config_from_dict, config_to_dict
    from megatron_prime.training.demo import demo_configs, local_rollout_server
    from megatron_prime.training.sft import sft
    from megatron_prime.training.trainer import train

    # Final HF exports are not needed for the comparison; the user's overrides come last and win.
    overrides = ["checkpoint.export_hf=false", f"train.steps={args.steps}", *args.override]
    seed_dirs = []
    for seed in args.seeds:
        seed_dir = os.path.join(args.out, f"seed{seed}")
        seed_dirs.append(seed_dir)
        print(f"[compare] seed {seed}: toy task, tiny model and SFT in {seed_dir}", flush=True)
        cfg, _ = demo_configs(seed_dir, seed, args.config, overrides, args.task)
        cfg.model.hf_path = sft(cfg)["hf"]  # shared by both methods of this seed
        for method, method_overrides in args.methods.items():
            run_dir = os.path.join(seed_dir, method.lower())
            shutil.rmtree(run_dir, ignore_errors=True)  # the logger appends: start clean
            run_cfg = config_from_dict(config_to_dict(cfg), method_overrides)
            run_cfg.logging.dir = os.path.join(run_dir, "logs")
            run_cfg.checkpoint.dir = os.path.join(run_dir, "checkpoints")
            run_cfg.checkpoint.export_dir = os.path.join(run_dir, "hf")
            run_cfg.checkpoint.resume = "none"
            os.makedirs(run_cfg.logging.dir)
            with open(os.path.join(run_cfg.logging.dir, RUN_INFO), "w") as f:
                json.dump({"method": method, "overrides": method_overrides, "seed": seed, "steps": args.steps,
                           "sft_hf": cfg.model.hf_path}, f)
            print(f"[compare] seed {seed}: {method} ({' '.join(method_overrides)}), {run_cfg.train.steps} steps",
                  flush=True)
            with local_rollout_server(run_cfg):  # rollout.max_staleness=1: a rollout server of its own
                train(run_cfg)
    return seed_dirs


# ---- plotting and the table -------------------------------------------------------------------

def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1:
        return values
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Mean over runs at the steps every run has."""
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [statistics.fmean(c[s] for c in curves) for s in steps]


def plot(runs: list[Run], png: str, window: int, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(19, 4.8))
    panels = [(axes[0], "train", TRAIN_KEY), (axes[1], "eval", EVAL_KEY), (axes[2], "prm", PRM_KEY)]
    labels = list(dict.fromkeys(r.label for r in runs))
    palette = iter(["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray", "tab:olive"])
    colors = {label: COLORS.get(label) or next(palette, "black") for label in labels}
    for ax, kind, ylabel in panels:
        smoothed = kind != "eval"
        for label in labels:
            group = [r for r in runs if r.label == label and getattr(r, kind)]
            several = len(group) > 1
            for r in group:
                curve = getattr(r, kind)
                steps = sorted(curve)
                ys = [curve[s] for s in steps]
                if smoothed:
                    ys = smooth(ys, window)
                name = f"{label} seed {r.seed}" if r.seed is not None else label
                ax.plot(steps, ys, color=colors[label], alpha=0.35 if several else 1.0,
                        linewidth=1.0 if several else 1.8, marker=None if smoothed else "o",
                        markersize=3 if several else 5, label=None if several else name)
            if several:
                steps, ys = mean_curve([getattr(r, kind) for r in group])
                if smoothed:
                    ys = smooth(ys, window)
                ax.plot(steps, ys, color=colors[label], linewidth=2.4, marker=None if smoothed else "o",
                        label=f"{label} (mean of {len(group)} seeds)")
        if kind == "prm":
            ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")  # where chance would sit
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        top = max((v for r in runs for v in getattr(r, kind).values()), default=0.0)
        top = max(0.05, min(1.02, top * 1.1))
        ax.set_ylim(-0.02 * top, top)  # accuracies: from 0 (a line at 0 stays visible)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    suffix = f"\n(moving average of {window} steps)" if window > 1 else ""
    axes[0].set_title("Training reward (sampled responses)" + suffix)
    axes[1].set_title("Held-out greedy accuracy")
    axes[2].set_title("Implicit PRM accuracy on each fresh batch,\nbefore its update" + suffix)
    fig.suptitle(title or f"{' vs '.join(dict.fromkeys(r.label for r in runs))} (same seeds, same budget)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def last_fraction_mean(curve: dict[int, float], fraction: float) -> float | None:
    steps = sorted(curve)
    tail = [curve[s] for s in steps[-max(1, round(len(steps) * fraction)):]]
    return statistics.fmean(tail) if tail else None


def steps_to_reach(curve: dict[int, float], target: float, window: int) -> int | None:
    """First step at which the smoothed curve reaches ``target``."""
    steps = sorted(curve)
    return next((s for s, v in zip(steps, smooth([curve[s] for s in steps], window)) if v >= target), None)


def baseline_target(runs: list[Run], seed: int | None, window: int) -> float | None:
    """The smoothed final training reward of the same seed's RLOO run."""
    base = next((r for r in runs if r.label == BASELINE and r.seed == seed and r.train), None)
    if base is None:
        return None
    steps = sorted(base.train)
    return smooth([base.train[s] for s in steps], window)[-1]


def summary_row(r: Run, runs: list[Run], window: int) -> list:
    eval_steps = sorted(r.eval)
    before = r.eval.get(0)
    final = r.eval[eval_steps[-1]] if eval_steps and eval_steps[-1] > 0 else None
    target = baseline_target(runs, r.seed, window)
    reached = steps_to_reach(r.train, target, window) if target is not None and r.train else None
    return [r.label, "-" if r.seed is None else str(r.seed), max(r.train, default=0), before, final,
            last_fraction_mean(r.train, 0.1), last_fraction_mean(r.prm, 0.25) if r.prm else None, reached,
            last_fraction_mean(r.flip, 1.0) if r.flip else None]


def print_table(runs: list[Run], window: int) -> None:
    """Per run and seed, then the mean of each method over its seeds."""
    rows = []
    for label in dict.fromkeys(r.label for r in runs):
        group = [summary_row(r, runs, window) for r in runs if r.label == label]
        rows += group
        if len(group) > 1:
            def avg(i):
                vals = [row[i] for row in group if row[i] is not None]
                return statistics.fmean(vals) if vals else None
            never = sum(row[7] is None for row in group)
            reached = avg(7)
            rows.append([label, "mean", "", avg(3), avg(4), avg(5), avg(6),
                         None if reached is None else f"{reached:.1f}" + (f" ({never} never)" if never else ""),
                         avg(8)])
    header = ["run", "seed", "steps", "eval before", "eval final", "train reward (last 10%)",
              "PRM fresh acc (last 25%)", f"steps to {BASELINE}'s final train reward", "flip frac (mean)"]

    def cell(i, x):
        if x is None:
            return "never" if i == 7 else "-"
        return _fmt(x) if isinstance(x, float) and i != 7 else str(x)

    text = [[cell(i, x) for i, x in enumerate(row)] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *text)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def sample_efficiency(runs: list[Run], window: int) -> str | None:
    """The paper's headline of Fig. 3: the step at which PRIME first reaches RLOO's final training
    reward (seed-mean, smoothed curves), as a fraction of RLOO's steps (paper: 40%)."""
    prime = [r.train for r in runs if r.label == "PRIME" and r.train]
    rloo = [r.train for r in runs if r.label == BASELINE and r.train]
    if not prime or not rloo:
        return None
    r_steps, r_vals = mean_curve(rloo)
    p_steps, p_vals = mean_curve(prime)
    if len(r_steps) < MIN_STEPS_FOR_EFFICIENCY or not p_steps:
        return None  # too short to say anything
    target = smooth(r_vals, window)[-1]
    reached = steps_to_reach(dict(zip(p_steps, p_vals)), target, window)
    if reached is None:
        return f"PRIME does not reach RLOO's final training reward ({target:.3f}) within {p_steps[-1]} steps"
    return (f"PRIME reaches RLOO's final training reward ({target:.3f}, smoothed over {window}) at step {reached} "
            f"= {100 * reached / r_steps[-1]:.0f}% of RLOO's {r_steps[-1]} steps (paper Fig. 3: 40%)")


def parse_method(text: str) -> tuple[str, list[str]]:
    """``LABEL=KEY=VALUE,KEY=VALUE`` -> (label, ["KEY=VALUE", ...])."""
    label, sep, rest = text.partition("=")
    if not sep or not label or "=" not in rest:
        raise argparse.ArgumentTypeError(f"--method {text!r}: expected LABEL=KEY=VALUE[,KEY=VALUE...]")
    return label, [item for item in rest.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--read", nargs="+", metavar="DIR", help="plot existing runs below these dirs")
    mode.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="run every method for these seeds")
    parser.add_argument("--steps", type=int, default=80, help="run mode: training steps per run (default 80)")
    parser.add_argument("--out", default="outputs/compare", help="run mode: output dir (default outputs/compare)")
    parser.add_argument("--config", default=None, help="run mode: config YAML (default: the tiny CPU demo config)")
    parser.add_argument("--task", default="default", choices=sorted(TOY_PRESETS),
                        help="run mode: the toy task's preset (default: the demo's a+b*c)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run mode: config overrides for every run, e.g. sft.steps=300 train.eval_every=10")
    parser.add_argument("--method", action="append", type=parse_method, metavar="LABEL=KEY=VALUE,...",
                        help=f"run mode: a method to run (repeatable; default PRIME and {BASELINE}); the label "
                             f"{BASELINE} is the baseline the table's last column measures against")
    parser.add_argument("--png", default=None, help="output image (default: OUT/compare.png, or ./compare.png with --read)")
    parser.add_argument("--smooth", type=int, default=0,
                        help="moving-average window for the training reward (default: steps/20, at least 1)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    args.methods = dict(args.method) if args.method else DEFAULT_METHODS

    if args.seeds:
        from megatron_prime.metrics import quiet_console

        quiet_console()
        dirs = run_comparison(args)
        png = args.png or os.path.join(args.out, "compare.png")
    else:
        dirs = args.read
        png = args.png or "compare.png"
    runs = find_runs(dirs)
    order = list(args.methods)
    runs.sort(key=lambda r: (order.index(r.label) if r.label in order else len(order), r.label,
                             r.seed if r.seed is not None else -1))
    longest = max((max(r.train, default=0) for r in runs), default=0)
    window = args.smooth or max(1, longest // 20)
    plot(runs, png, window, args.title)
    print()
    print_table(runs, window)
    line = sample_efficiency(runs, window)
    if line:
        print("\n" + line)
    print(f"\nplot: {png}")


if __name__ == "__main__":
    main()
