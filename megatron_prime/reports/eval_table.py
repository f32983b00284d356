"""``megatron-prime eval``: the paper's benchmark table (Table 1) for a checkpoint.

Prompts go through the rollout fleet (every engine a shard), responses are graded by our
verifiers, and a response counts as correct when its verifier gives full marks (math: the answer
is equivalent; code: every test passes). Greedy runs report accuracy; sampled runs (``samples``
K > 1 or a temperature) report avg@K and the unbiased pass@k.

Work is done in chunks; after each chunk its graded prompts are appended to
``OUT.partial.jsonl``, so a run that dies halfway keeps them and a rerun with the same settings
skips them. The finished run writes ``OUT.json`` (settings, metrics, the table and every graded
response) and ``OUT.md`` (the table), then removes the partial file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from megatron_prime.reports.benchmarks import COLUMN_TITLES, PAPER_COLUMNS, PAPER_ROWS, Benchmark
from megatron_prime.reports.files import ReportError, append_jsonl, read_jsonl, write_atomic
from megatron_prime.reports.pass_at_k import pass_at_k, powers_of_two_through

RESULT_FORMAT = "megatron-prime/eval"


@dataclass(frozen=True)
class EvalSettings:
    model: str
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    max_prompt_len: int = 4096
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1:
            raise ReportError(f"--samples must be >= 1, got {self.samples}")
        if self.samples > 1 and self.temperature == 0.0:
            raise ReportError(f"--samples {self.samples} with --temperature 0 would repeat one greedy response; "
                              "give a temperature > 0 (the paper samples at 1.0)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def metric_names(self) -> list[str]:
        """The metrics shown in the table, one row each."""
        return ["greedy"] if self.greedy else [f"avg@{self.samples}", f"pass@{self.samples}"]


def is_correct(score: float) -> bool:
    return score >= 1.0 - 1e-9


def benchmark_seed(seed: int, name: str) -> int:
    """The sampling seed of one benchmark: independent of which other benchmarks run."""
    return int.from_bytes(hashlib.blake2b(f"eval/{seed}/{name}".encode(), digest_size=8).digest(), "little") >> 1


# ---- running ---------------------------------------------------------------------------------


def _record(benchmark: str, position: int, row, graded) -> dict:
    return {
        "benchmark": benchmark,
        "position": position,  # the row's place in the benchmark file's loaded rows
        "problem": row.prompt,
        "prompt": graded[0].prompt_text,
        "answer": row.ground_truth if row.verifier == "math" else None,  # code tests can be megabytes
        "verifier": row.verifier,
        "responses": [{"text": g.response.text, "score": g.score, "correct": is_correct(g.score),
                       "finish_reason": g.response.finish_reason, "num_tokens": len(g.response.token_ids)}
                      for g in graded],
    }


def _resume(partial_path: str, settings: EvalSettings, benchmarks: list[Benchmark]) -> dict[str, dict[int, dict]]:
    """Graded prompts a previous run with the same settings left in ``partial_path``."""
    done: dict[str, dict[int, dict]] = {b.name: {} for b in benchmarks}
    records, torn = read_jsonl(partial_path) if os.path.exists(partial_path) else ([], False)
    if not records:
        write_atomic(partial_path, json.dumps({"settings": dataclasses.asdict(settings)}) + "\n")
        return done
    if torn:  # drop the line a killed run was writing, so that appends start on a fresh line
        write_atomic(partial_path, "".join(json.dumps(r) + "\n" for r in records))
    if records[0].get("settings") != dataclasses.asdict(settings):
        before = records[0].get("settings") if records else None
        raise ReportError(f"{partial_path} holds a run with other settings ({before}); rerun with those "
                          f"settings to finish it, or delete the file to start over")
    rows = {b.name: b.rows for b in benchmarks}
    for record in records[1:]:
        name, position = record.get("benchmark"), record.get("position")
        if name in rows and isinstance(position, int) and position < len(rows[name]) \
                and rows[name][position].prompt == record.get("problem"):
            done[name][position] = record
        elif name in rows:
            raise ReportError(f"{partial_path}: benchmark {name} row {position} is not in its file any more "
                              f"(the file changed); delete {partial_path} to start over")
    return done


def _runs(positions: list[int], chunk: int) -> list[list[int]]:
    """Contiguous pieces of at most ``chunk`` positions (per-sample seeds follow positions)."""
    pieces: list[list[int]] = []
    for p in positions:
        if pieces and pieces[-1][-1] == p - 1 and len(pieces[-1]) < chunk:
            pieces[-1].append(p)
        else:
            pieces.append([p])
    return pieces


def run_benchmarks(fleet, tokenizer, benchmarks: list[Benchmark], settings: EvalSettings, partial_path: str,
                   chunk: int, log=print) -> dict[str, list[dict]] | None:
    """Every loaded benchmark's graded prompts, in file order, on global rank 0 (None elsewhere);
    every rank calls this with the same arguments."""
    from megatron_prime.data import render_prompt
    from megatron_prime.platform.distributed import broadcast_object, is_rank0, on_rank0
    from megatron_prime.fleet.grading import fleet_graded_responses, sampling_params

    loaded = [b for b in benchmarks if b.rows]
    done = on_rank0(lambda: _resume(partial_path, settings, loaded))
    todo = broadcast_object(None if done is None else
                            {b.name: [i for i in range(len(b.rows)) if i not in done[b.name]] for b in loaded})
    per_step = chunk * len(fleet.groups)
    for b in loaded:
        sampling = sampling_params(fleet, n=settings.samples, temperature=settings.temperature,
                                   top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                                   seed=benchmark_seed(settings.seed, b.name))
        start, total = time.perf_counter(), len(b.rows)
        remaining = todo[b.name]
        if is_rank0() and len(remaining) < total:
            log(f"[eval] {b.name}: {total - len(remaining)} of {total} prompts already graded ({partial_path})")
        finished = 0
        for piece in _runs(remaining, per_step):
            groups = fleet_graded_responses(fleet, [b.rows[i] for i in piece], tokenizer, render_prompt, sampling,
                                            max_prompt_len=settings.max_prompt_len, prompt_offset=piece[0])
            if not is_rank0():
                continue
            records = [_record(b.name, i, b.rows[i], g) for i, g in zip(piece, groups)]
            append_jsonl(partial_path, records)
            done[b.name].update(zip(piece, records))
            finished += len(piece)
            elapsed = time.perf_counter() - start
            left = elapsed / finished * (len(remaining) - finished)
            log(f"[eval] {b.name}: {len(done[b.name])}/{total} prompts ({elapsed:.0f} s, about {left:.0f} s left)")
    if not is_rank0():
        return None
    return {b.name: [done[b.name][i] for i in range(len(b.rows))] for b in loaded}


# ---- metrics and the result file -------------------------------------------------------------


def benchmark_metrics(records: list[dict], settings: EvalSettings) -> dict:
    k = settings.samples
    correct = [sum(r["correct"] for r in rec["responses"]) for rec in records]
    scores = [r["score"] for rec in records for r in rec["responses"]]
    metrics = {"prompts": len(records), "samples": k, "mean_score": sum(scores) / len(scores)}
    if settings.greedy:
        metrics["greedy"] = sum(correct) / len(correct)
    else:
        metrics[f"avg@{k}"] = sum(correct) / (k * len(correct))
        for j in powers_of_two_through(k):
            metrics[f"pass@{j}"] = sum(pass_at_k(k, c, j) for c in correct) / len(correct)
    return metrics


def result_document(label: str, settings: EvalSettings, benchmarks: list[Benchmark],
                    graded: dict[str, list[dict]]) -> dict:
    return {
        "format": RESULT_FORMAT,
        "version": 1,
        "label": label,
        "settings": dataclasses.asdict(settings),
        "metric_names": settings.metric_names,
        "columns": [[b.name, b.title] for b in benchmarks],
        "benchmarks": {name: {"path": next(b.path for b in benchmarks if b.name == name),
                              **benchmark_metrics(records, settings)} for name, records in graded.items()},
        "missing": {b.name: b.problem for b in benchmarks if b.problem},
        "responses": [record for records in graded.values() for record in records],
    }


def write_results(doc: dict, out_path: str, table: str) -> None:
    write_atomic(out_path, json.dumps({**doc, "table": table}, indent=1) + "\n")
    write_atomic(os.path.splitext(out_path)[0] + ".md", table + "\n")


def read_result(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"--compare {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"--compare {path}: not valid JSON ({e}); expected a file `megatron-prime eval` wrote") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULT_FORMAT:
        raise ReportError(f"--compare {path}: not a megatron-prime eval result (expected \"format\": "
                          f"\"{RESULT_FORMAT}\", as `megatron-prime eval --out` writes)")
    return doc


# ---- the table -------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    values: dict[str, float]  # column -> percent
    missing: set = field(default_factory=set)  # columns this run could not load
    published_average: float | None = None  # the paper's own average over its seven columns


def result_rows(doc: dict) -> list[Row]:
    """One row per metric of an eval result (greedy; or avg@K and pass@K)."""
    rows = []
    for metric in doc["metric_names"]:
        values = {name: 100.0 * m[metric] for name, m in doc["benchmarks"].items() if metric in m}
        rows.append(Row(f"{doc['label']} ({metric})", values, set(doc.get("missing", {}))))
    return rows


def paper_rows(spec: str) -> list[Row]:
    """``paper`` (both published rows), ``paper:prime`` or ``paper:sft``."""
    which = spec.partition(":")[2] or None
    if which not in (None, *PAPER_ROWS):
        raise ReportError(f"--compare {spec}: unknown paper row; use paper, "
                          + ", ".join(f"paper:{k}" for k in PAPER_ROWS))
    chosen = [PAPER_ROWS[which]] if which else [PAPER_ROWS["sft"], PAPER_ROWS["prime"]]
    return [Row(r.label, {k: v for k, v in r.values.items() if v is not None}, published_average=r.average)
            for r in chosen]


def compare_rows(specs: list[str]) -> tuple[list[Row], list[list[str]]]:
    """Rows for ``--compare`` (eval result files and built-in paper rows) and their columns."""
    rows, columns = [], []
    for spec in specs:
        if spec == "paper" or spec.startswith("paper:"):
            rows += paper_rows(spec)
            columns += [[k, t] for k, t in PAPER_COLUMNS]
        else:
            doc = read_result(spec)
            rows += result_rows(doc)
            columns += doc["columns"]
    return rows, columns


def merge_columns(*column_lists: list[list[str]]) -> list[tuple[str, str]]:
    """Columns in the paper's order first, then others in order of appearance, once each."""
    seen: dict[str, str] = {}
    for columns in column_lists:
        for key, title in columns:
            seen.setdefault(key, title)
    order = {key: i for i, (key, _) in enumerate(PAPER_COLUMNS)}
    return sorted(seen.items(), key=lambda kv: order.get(kv[0], len(order)))


def _average(row: Row, keys: list[str]) -> str:
    if row.published_average is not None:
        # The paper's average is over exactly its seven benchmarks (from unrounded numbers).
        return f"{row.published_average:.1f}" if set(keys) == set(COLUMN_TITLES) else "–"
    values = [row.values[k] for k in keys if k in row.values]
    if not values:
        return "–"
    mean = f"{sum(values) / len(values):.1f}"
    return mean if len(values) == len(keys) else mean + "*"


def _cell(row: Row, key: str) -> str:
    if key in row.values:
        return f"{row.values[key]:.1f}"
    return "missing" if key in row.missing else "–"


def format_table(columns: list[tuple[str, str]], rows: list[Row]) -> str:
    """A Markdown table in the layout of the paper's Table 1: accuracy in percent per benchmark
    and the average. With any of the paper's benchmarks in the table, "Avg." follows them and is
    their mean (as the paper's); other columns (e.g. the toy task) come after it, not averaged."""
    paper = [(k, t) for k, t in columns if k in COLUMN_TITLES]
    extra = [(k, t) for k, t in columns if k not in COLUMN_TITLES]
    averaged = [k for k, _ in (paper or extra)]
    after = extra if paper else []
    header = ["model", *(t for _, t in paper or extra), "Avg.", *(t for _, t in after)]
    body = [[r.label, *(_cell(r, k) for k in averaged), _average(r, averaged), *(_cell(r, k) for k, _ in after)]
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    notes = []
    if any(c.endswith("*") for r in body for c in r):
        notes.append("* mean over the benchmarks that row has")
    if any(c == "missing" for r in body for c in r):
        notes.append("missing: the benchmark could not be loaded for that run (see its error line)")
    return "\n".join([line(header), rule, *map(line, body), *notes])
