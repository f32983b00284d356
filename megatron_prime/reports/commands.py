"""Argument parsing for ``megatron-prime eval | score | inspect``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_prime.errors import exit_code
from megatron_prime.reports.files import ReportError


def _rank0() -> bool:
    from megatron_prime.platform.distributed import is_rank0

    return is_rank0()


# ---- eval ------------------------------------------------------------------------------------


def eval_parser() -> argparse.ArgumentParser:
    from megatron_prime.reports.benchmarks import PAPER_BENCHMARKS

    p = argparse.ArgumentParser(
        prog="megatron-prime eval",
        description="Benchmark accuracy of a checkpoint in the layout of the paper's Table 1. Under torchrun, "
                    "every rank drives an engine and takes a shard of the prompts.")
    p.add_argument("--model", help="Hugging Face or Megatron checkpoint dir (omit to only --compare)")
    p.add_argument("--benchmarks", default="",
                   help=f"comma-separated NAME or NAME=PATH; 'paper' = {PAPER_BENCHMARKS}")
    p.add_argument("--data-dir", help="where NAME.jsonl / .json / .parquet of each benchmark is")
    p.add_argument("--data", nargs="*", default=[], metavar="[NAME=]FILE",
                   help="prompt files in the training format, one column each (e.g. the toy task's eval.jsonl)")
    p.add_argument("--samples", type=int, default=1, help="responses per prompt (K); >1 reports avg@K and pass@k")
    p.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for 1 sample, else 1.0")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-prompt-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["hf", "sglang", "vllm"], default="hf")
    p.add_argument("--tp", type=int, default=1, help="GPUs per sglang/vllm engine")
    p.add_argument("--chunk", type=int, default=64, help="prompts per engine between progress lines and saves")
    p.add_argument("--limit", type=int, default=0, help="the first LIMIT prompts of each benchmark (0: all)")
    p.add_argument("--label", help="the row's name (default: the checkpoint's directory name)")
    p.add_argument("--out", help="results file (default outputs/eval/LABEL.json; the table goes beside it as .md)")
    p.add_argument("--compare", nargs="*", default=[], metavar="RESULT.json|paper|paper:sft|paper:prime",
                   help="earlier results, or the paper's published rows, shown as extra rows")
    return p


def evaluate(argv) -> int:
    args = eval_parser().parse_args(argv)

    def run():
        from megatron_prime.platform.distributed import broadcast_object, on_rank0
        from megatron_prime.reports import eval_table
        from megatron_prime.reports.benchmarks import PAPER_BENCHMARKS, load_benchmarks
        from megatron_prime.reports.engines import start_fleet

        extra_rows, extra_columns = eval_table.compare_rows(args.compare)
        if not args.model:
            if not args.compare:
                raise ReportError("give --model to evaluate, or --compare RESULT.json ... to print a table")
            print(eval_table.format_table(eval_table.merge_columns(extra_columns), extra_rows))
            return 0
        specs = [s.strip() for s in args.benchmarks.split(",") if s.strip()]
        specs = [b for s in specs for b in (PAPER_BENCHMARKS.split(",") if s == "paper" else [s])]
        if not specs and not args.data:
            raise ReportError("nothing to evaluate: give --benchmarks NAME,... (with --data-dir) or --data FILE")
        temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)
        settings = eval_table.EvalSettings(
            model=os.path.abspath(args.model), samples=args.samples, temperature=temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len, seed=args.seed)
        label = args.label or os.path.basename(os.path.normpath(args.model))
        out = args.out or os.path.join("outputs", "eval", f"{label}.json")
        benchmarks = broadcast_object(on_rank0(lambda: load_benchmarks(specs, args.data_dir, args.data, args.limit)))
        problems = [b.problem for b in benchmarks if b.problem]
        if _rank0():
            for line in problems:
                print(f"error: {line}", file=sys.stderr)
        if len(problems) == len(benchmarks):
            raise ReportError(f"none of the {len(benchmarks)} benchmarks could be loaded (see above)")
        fleet, tokenizer = start_fleet(args.model, engine=args.engine, tp=args.tp, seed=args.seed,
                                       cache_dir=os.path.dirname(os.path.abspath(out)))
        try:
            graded = eval_table.run_benchmarks(fleet, tokenizer, benchmarks, settings, out + ".partial.jsonl",
                                               args.chunk, log=lambda m: print(m, flush=True))
        finally:
            fleet.shutdown()
        if not _rank0():
            return 0
        doc = eval_table.result_document(label, settings, benchmarks, graded)
        columns = eval_table.merge_columns(doc["columns"], extra_columns)
        table = eval_table.format_table(columns, eval_table.result_rows(doc) + extra_rows)
        eval_table.write_results(doc, out, table)
        os.unlink(out + ".partial.jsonl")
        print(table)
        print(f"results and every graded response: {out} (table: {os.path.splitext(out)[0]}.md)")
        return 1 if problems else 0

    return exit_code(run)


# ---- score -----------------------------------------------------------------------------------


def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-prime score",
        description="Best-of-N with the implicit PRM (paper Eq. 3: beta * sum_t log pi_prm/pi_ref) against "
                    "majority vote, random choice and the oracle.")
    p.add_argument("--prm", required=True, help="the implicit PRM: HF dir (the trainer's export_dir/prm), a Megatron "
                   "checkpoint (a trainer step's prm/), or a LoRA run's PEFT adapter (export_dir/prm_adapter), "
                   "applied to --ref")
    p.add_argument("--ref", required=True, help="the reference model, HF or Megatron (the starting SFT model)")
    p.add_argument("--data", required=True, help="prompt file in the training format")
    p.add_argument("--benchmark", help="read --data in this evaluation set's format instead (e.g. math500)")
    p.add_argument("--samples", type=int, required=True, help="responses per prompt (the largest N)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--policy", help="sample the responses from this checkpoint (hf engine)")
    source.add_argument("--responses", help='JSON lines {"index": ROW, "response": TEXT}, ROW = 0-based row of --data')
    p.add_argument("--beta", type=float, default=0.05, help="the implicit reward scale the PRM was trained with")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-prompt-len", type=int, default=4096)
    p.add_argument("--limit", type=int, default=0, help="use the first LIMIT prompts (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results file (default outputs/score/DATA.json)")
    return p


def _vocab_size(path: str) -> int:
    config = os.path.join(path, "config.json")
    try:
        with open(config) as f:
            return json.load(f)["vocab_size"]
    except (OSError, ValueError, KeyError):
        raise ReportError(f"{path}: not a Hugging Face checkpoint (no readable config.json with vocab_size)") from None


def check_adapter_base(adapter_dir: str, ref: str) -> None:
    """An implicit PRM given as a PEFT adapter is applied to --ref: refuse a --ref other than the base
    the adapter was trained on (when that base is still where the adapter says)."""
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path") or ""
    except (OSError, ValueError) as e:
        raise ReportError(f"{adapter_dir}/adapter_config.json: not readable ({e})") from None
    if base and os.path.isdir(base) and os.path.realpath(base) != os.path.realpath(ref):
        raise ReportError(f"--prm {adapter_dir} is a LoRA adapter of {base}; --ref {ref} is another model. Give "
                          f"--ref {base}: in shared-base LoRA PRIME the reference is the adapters' base")


def score(argv) -> int:
    args = score_parser().parse_args(argv)

    def run():
        import torch
        from transformers import AutoTokenizer

        from megatron_prime.data.eval_sets import load_eval_set
        from megatron_prime.data.schema import load_prompt_dataset
        from megatron_prime.reports import score as bon

        if args.samples < 1:
            raise ReportError(f"--samples must be >= 1, got {args.samples}")
        from megatron_prime.reports.engines import hf_checkpoint, is_hf_checkpoint
        from megatron_prime.reports.implicit_prm import is_adapter

        out = args.out or bon.default_out(args.data)
        cache_dir = os.path.dirname(os.path.abspath(out))
        # A Megatron checkpoint (e.g. a trainer step's prm/) is converted to HF beside the results.
        args.ref = hf_checkpoint(args.ref, cache_dir)
        models = {"--ref": args.ref}
        if is_adapter(args.prm):
            check_adapter_base(args.prm, args.ref)
        else:
            args.prm = models["--prm"] = hf_checkpoint(args.prm, cache_dir)
        if args.policy and is_hf_checkpoint(args.policy):  # a Megatron policy is converted later
            models["--policy"] = args.policy
        sizes = {flag: _vocab_size(path) for flag, path in models.items()}
        if len(set(sizes.values())) > 1:
            raise ReportError(f"the models do not share a vocabulary: vocab_size {sizes}")
        all_rows = load_eval_set(args.benchmark, args.data) if args.benchmark else load_prompt_dataset(args.data)
        rows = all_rows[:args.limit] if args.limit else all_rows
        if args.policy:
            scored = bon.responses_from_policy(args.policy, rows, args.samples, temperature=args.temperature,
                                               max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
                                               seed=args.seed, cache_dir=cache_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.ref)
            scored = bon.responses_from_file(args.responses, rows, tokenizer, args.samples, args.max_prompt_len,
                                             num_rows=len(all_rows))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        bon.add_prm_rewards(scored, args.prm, args.ref, args.beta, device)
        summary = bon.summarize(scored)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        bon.write_score_results(out, settings, summary, scored, rows)
        print(bon.report_text(summary, len(rows), args.samples))
        print(f"per-response rewards: {out}")

    return exit_code(run)


# ---- inspect ---------------------------------------------------------------------------------


def inspect(argv) -> int:
    p = argparse.ArgumentParser(prog="megatron-prime inspect",
                                description="one self-contained HTML page of a run's process rewards and scalars")
    p.add_argument("run_dir", help="the run's logging.dir (or a directory whose logs/ it is)")
    p.add_argument("--step", type=int, help="the step whose samples to show (default: the latest logged)")
    p.add_argument("--out", help="the page (default RUN_LOG_DIR/report.html)")
    p.add_argument("--max-prompts", type=int, default=32, help="prompts of the step shown")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    args = p.parse_args(argv)

    def run():
        from megatron_prime.reports.page import write_page

        out, counts = write_page(args.run_dir, args.out, args.step, args.max_prompts)
        print(f"wrote {out}: step {counts['step']}, {counts['prompts']} prompts, {counts['responses']} responses, "
              f"{counts['coloured_tokens']} coloured tokens")
        url = "file://" + os.path.abspath(out)
        if args.open:
            import webbrowser

            if not webbrowser.open(url):
                print(f"no browser found here; open {url}")
        else:
            print(f"open it: {url}")

    return exit_code(run)
