"""Benchmark one training step, phase by phase: PRIME vs outcome-only RLOO on a paper-shaped config.

Builds the toy task and the tiny Qwen2 of the demo (``megatron_prime.training.demo.demo_configs``),
runs SFT once so responses have realistic lengths (or takes ``--hf SFT_HF_DIR``), then builds two
trainer contexts in one process from the same SFT checkpoint and seed: ``algorithm.estimator=prime_rloo``
(policy + implicit PRM + reference) and ``algorithm.estimator=rloo`` (policy only). The batch is
shaped like the paper's: ``--updates`` policy mini-batches per rollout step (paper: 256 prompts x 4
responses in mini-batches of 256, i.e. 4 updates), and the PRM takes as many mini-batch steps. After
a warm-up step each, it runs ``--steps`` steps of each, ALTERNATING (PRIME, RLOO, RLOO, PRIME, ...)
so machine noise hits both equally, and prints the mean seconds per phase (the ``time/<phase>``
metrics of ``prime_step``).

Beside the measured PRIME/RLOO step-time ratio it prints the ratio the extra passes' FLOPs predict.
The three models have the same shape and see the same tokens, so a pass's FLOPs are set by its
kind: a forward is 1 unit, a forward + backward 3 units (backward = 2 forwards). The policy's own
passes are the old log-probs (1) and its updates (3 per epoch); PRIME adds the reference forward
(1), the PRM update (3) and, with ``prm_update=double``, a PRM forward (1). Each extra phase's
predicted time is its units times the seconds per unit of the policy's passes measured in the same
PRIME run; measured / predicted > 1 is work the FLOPs do not ask for (target: at most 1.1). The
paper's ratio (Table 2, 7B on 8xA800: 680.3 s / 530.7 s = 1.28) is printed for context only.

    python tools/benchmarks/bench_step.py [--steps 5] [--updates 4] [--sft-steps 400] [--hf SFT_HF_DIR]
                                          [--override KEY=VALUE ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, quiet  # noqa: E402

# Phases in the order prime_step runs them (time/<phase> metric keys).
PHASES = [
    ("rollout", "rollout (generate)"),
    ("verify", "verify (outcome reward)"),
    ("reference_forward", "reference forward"),
    ("prm_forward", "PRM forward (double/none)"),
    ("prm_update", "PRM update (fwd+bwd+step)"),
    ("old_logprobs", "old log-probs (policy fwd)"),
    ("policy_update", "policy update"),
    ("weight_sync", "weight sync"),
    ("other", "other (batching, advantages, ...)"),
]
PAPER = {"prime": 680.3, "rloo": 530.7}
CONTEXT_KEYS = [("response/length_mean", "mean response length (tokens)"),
                ("filter/rounds", "rollout rounds per step"),
                ("outcome/accuracy_sampled", "sampled accuracy")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per estimator (default 5)")
    parser.add_argument("--updates", type=int, default=4,
                        help="policy (and PRM) mini-batches per rollout step (default 4, as the paper)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per estimator first (default 1)")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="SFT steps before timing (default: the config's sft.steps, 400 in tiny_cpu.yaml, "
                             "which gives sampled accuracies inside the filter band; 0 = no SFT)")
    parser.add_argument("--hf", default=None, help="start from this HF checkpoint (e.g. an SFT export; skips SFT)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for both runs, e.g. train.prompts_per_step=16")
    parser.add_argument("--workdir", default=None, help="toy task, SFT and checkpoints (default: a temp dir, removed)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    quiet()
    from megatron_prime.platform import distributed
    from megatron_prime.training.demo import demo_configs
    from megatron_prime.training.prime_step import prime_step
    from megatron_prime.training.sft import sft
    from megatron_prime.training.trainer import build_context
    from megatron_prime.training.validation import validate_run

    work = args.workdir or tempfile.mkdtemp(prefix="bench_step-")
    try:
        overrides = ([f"sft.steps={args.sft_steps}"] if args.sft_steps else []) + list(args.override)
        cfg, _ = demo_configs(work, args.seed, None, overrides)
        responses = cfg.train.prompts_per_step * cfg.rollout.n
        if responses % args.updates:
            raise SystemExit(f"--updates {args.updates} must divide the {responses} responses of a step")
        cfg.train.mini_batch_responses = responses // args.updates
        cfg.train.prm_mini_batch_responses = 0  # the policy's mini-batch, as veRL's PRIME recipe
        env = distributed.setup(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep, cfg.train.seed)
        if env.world_size != 1:
            raise SystemExit("bench_step runs in one process")
        if args.hf:
            cfg.model.hf_path = args.hf
        elif args.sft_steps != 0:
            print(f"SFT: {cfg.sft.steps} steps (once, shared by both runs) ...", flush=True)
            cfg.model.hf_path = sft(cfg)["hf"]

        contexts = {}
        for name, estimator in (("prime", "prime_rloo"), ("rloo", "rloo")):
            run_cfg = copy.deepcopy(cfg)
            run_cfg.algorithm.estimator = estimator
            validate_run(run_cfg, world_size=1)
            torch.manual_seed(run_cfg.train.seed)
            contexts[name] = build_context(run_cfg)
            contexts[name].fleet.sync()

        metrics: dict[str, list[dict]] = {"prime": [], "rloo": []}
        total = args.warmup + args.steps
        for step in range(total):
            order = ["prime", "rloo"] if step % 2 == 0 else ["rloo", "prime"]
            for name in order:
                m, _ = prime_step(contexts[name], step)
                timed = step >= args.warmup
                print(f"step {step + 1}/{total} {name:5s} {'' if timed else '(warm-up) '}"
                      f"{m['time/step']:6.2f} s  len {m.get('response/length_mean', 0):5.1f}  "
                      f"acc {m.get('outcome/accuracy_sampled', 0):.3f}", flush=True)
                if timed:
                    metrics[name].append(m)
        for ctx in contexts.values():
            ctx.fleet.shutdown()
        report(cfg, args, metrics)
    finally:
        distributed.teardown()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


# FLOP units per phase (forward = 1, forward + backward = 3), for ppo_epochs epochs
def flop_units(cfg) -> dict[str, float]:
    epochs = cfg.algorithm.ppo_epochs
    return {"old_logprobs": 1.0, "policy_update": 3.0 * epochs, "reference_forward": 1.0, "prm_update": 3.0,
            "prm_forward": 1.0 if cfg.algorithm.prm_update != "single" else 0.0}


def report(cfg, args, metrics: dict[str, list[dict]]) -> None:
    def mean(name, key):
        return statistics.fmean(m.get(key, 0.0) for m in metrics[name])

    step = {name: mean(name, "time/step") for name in metrics}
    print()
    print(f"bench_step: tiny CPU config, {cfg.train.prompts_per_step} prompts x K={cfg.rollout.n} in "
          f"{args.updates} policy mini-batches of {cfg.train.mini_batch_responses}, max response "
          f"{cfg.data.max_response_len} tokens, "
          f"{'SFT checkpoint ' + args.hf if args.hf else f'{cfg.sft.steps if args.sft_steps != 0 else 0} SFT steps'}; "
          f"mean over {args.steps} alternating steps each after {args.warmup} warm-up")

    def cells(name, key):  # seconds and share of the step, or "-" where the run has no such phase
        if not any(f"time/{key}" in m for m in metrics[name]):
            return ["-", "-"]
        t = mean(name, f"time/{key}")
        return [f"{t:.3f}", f"{100 * t / step[name]:.0f}%"]

    units = flop_units(cfg)
    policy_units = units["old_logprobs"] + units["policy_update"]
    per_unit = (mean("prime", "time/old_logprobs") + mean("prime", "time/policy_update")) / policy_units
    rows, predicted_extra = [], 0.0
    for key, label in PHASES:
        p, r = cells("prime", key), cells("rloo", key)
        if p[0] == r[0] == "-":
            continue
        ratio = f"{float(p[0]) / float(r[0]):.2f}x" if "-" not in (p[0], r[0]) and float(r[0]) > 0 else "-"
        predicted = vs = "-"
        if key in units and p[0] != "-" and units[key]:
            predicted = f"{units[key] * per_unit:.3f}"
            vs = f"{float(p[0]) / (units[key] * per_unit):.2f}"
            if r[0] == "-":  # a phase only PRIME has
                predicted_extra += units[key] * per_unit
        rows.append([label, *p, *r, ratio, f"{units.get(key, 0):g}" if key in units else "-", predicted, vs])
    rows.append(["STEP", f"{step['prime']:.3f}", "100%", f"{step['rloo']:.3f}", "100%",
                 f"{step['prime'] / step['rloo']:.2f}x", "", "", ""])
    print_table(["phase", "PRIME s", "share", "RLOO s", "share", "PRIME/RLOO", "FLOP units",
                 "FLOP-predicted s", "measured/predicted"], rows)
    print()
    print_table(["context", "PRIME", "RLOO"],
                [[label, f"{mean('prime', key):.2f}", f"{mean('rloo', key):.2f}"] for key, label in CONTEXT_KEYS])
    predicted_ratio = (step["rloo"] + predicted_extra) / step["rloo"]
    print(f"\nPRIME/RLOO step-time ratio: {step['prime'] / step['rloo']:.2f} measured, {predicted_ratio:.2f} predicted "
          f"by the extra passes' FLOPs (paper, 7B on 8xA800, Table 2: {PAPER['prime'] / PAPER['rloo']:.2f})")


if __name__ == "__main__":
    main()
