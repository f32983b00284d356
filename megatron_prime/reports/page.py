"""``megatron-prime inspect``: one self-contained HTML page of a run (no network, no external
scripts or fonts): plots of the key training scalars over steps, then the sampled responses of one
step grouped by prompt, each token coloured by its implicit process reward on a diverging scale,
with outcome, sequence reward and advantage per response and filters for correct/incorrect.

It reads the run's ``samples.jsonl`` and ``scalars.jsonl`` (``logging.dir``). A run still writing
(a cut-off last line), a run with no samples yet and a run without process rewards (outcome-only
estimators) give a note on the page instead of an error.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field

from megatron_prime.reports.files import ReportError, read_jsonl, write_atomic

# (title, [(scalar key, legend label)], note under the plot)
PLOTS = (
    ("Outcome accuracy", [("outcome/accuracy_sampled", "sampled (all rollouts)"),
                          ("outcome/accuracy_filtered", "trained on (after the filter)"),
                          ("eval/accuracy", "held-out greedy")], ""),
    ("PRM loss", [("prm/loss", "cross-entropy")], "ln 2 = 0.693 is chance"),
    ("PRM fresh-batch accuracy", [("prm/accuracy", "before its update on the batch")], "0.5 is chance"),
    ("Advantage", [("advantage/mean", "mean"), ("advantage/std", "std"), ("advantage/min", "min"),
                   ("advantage/max", "max")], ""),
    ("Advantage against the outcome", [("advantage/flip_frac", "flipped (of responses with an outcome term)"),
                                       ("advantage/flip_incorrect_up", "incorrect pushed up"),
                                       ("advantage/flip_correct_down", "correct pushed down")],
     "flipped: mean advantage and outcome term of opposite signs"),
    ("Response length (tokens)", [("response/length_mean", "mean")], ""),
    ("Sequence reward", [("process_reward/sequence_mean", "mean of beta * sum_t q_t")], ""),
)
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
NEGATIVE, POSITIVE = (202, 0, 32), (5, 113, 176)  # diverging red - white - blue

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #555; } .notes p { background: #fff6d6; border-left: 4px solid #e0b000; padding: 6px 10px; margin: 6px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plot { border: 1px solid #ddd; border-radius: 4px; padding: 4px; background: #fff; }
.legend { display: flex; align-items: center; gap: 8px; margin: 8px 0; }
.legend .bar { width: 260px; height: 14px; border: 1px solid #999; }
.filters button { font: inherit; padding: 3px 10px; margin-right: 4px; border: 1px solid #888; background: #f4f4f4; border-radius: 3px; cursor: pointer; }
.filters button.on { background: #333; color: #fff; }
.group { border: 1px solid #ccc; border-radius: 4px; margin: 12px 0; padding: 8px 10px; }
.prompt { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; background: #f3f3f3; padding: 4px 6px; }
.ghead { color: #555; margin: 4px 0; }
.response { margin: 6px 0 6px 12px; padding: 4px 8px; border-left: 4px solid #bbb; }
.response.correct { border-left-color: #2a9d3a; } .response.incorrect { border-left-color: #c0392b; }
.rhead { font-size: 13px; color: #333; margin-bottom: 2px; }
.verdict { font-weight: 600; } .correct .verdict { color: #2a7d32; } .incorrect .verdict { color: #b03020; }
.response.flipped { background: #fff3e0; } .flip { font-weight: 600; color: #a05a00; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-all; line-height: 1.7; }
.tok, .ptok { padding: 1px 0; }
"""

SCRIPT = """
document.querySelectorAll('.filters button').forEach(function (button) {
  button.addEventListener('click', function () {
    var want = button.dataset.filter;
    document.querySelectorAll('.filters button').forEach(function (b) { b.classList.toggle('on', b === button); });
    document.querySelectorAll('.response').forEach(function (r) {
      r.hidden = want !== 'all' && !r.classList.contains(want);
    });
    document.querySelectorAll('.group').forEach(function (g) {
      g.hidden = g.querySelectorAll('.response:not([hidden])').length === 0;
    });
  });
});
// report.html#correct, #incorrect or #flipped opens with that filter on
var initial = document.querySelector('.filters button[data-filter="' + location.hash.slice(1) + '"]');
if (initial) { initial.click(); }
"""


@dataclass
class RunFiles:
    log_dir: str
    scalars: dict[int, dict] = field(default_factory=dict)  # step -> merged metrics
    samples: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_log_dir(run_dir: str) -> str:
    for candidate in (run_dir, os.path.join(run_dir, "logs")):
        if any(os.path.exists(os.path.join(candidate, f)) for f in ("scalars.jsonl", "samples.jsonl")):
            return candidate
    raise ReportError(f"{run_dir}: no scalars.jsonl or samples.jsonl here or in {os.path.join(run_dir, 'logs')} "
                      f"(expected a run's logging.dir)")


def read_run(run_dir: str) -> RunFiles:
    run = RunFiles(find_log_dir(run_dir))
    for name in ("scalars.jsonl", "samples.jsonl"):
        path = os.path.join(run.log_dir, name)
        if not os.path.exists(path):
            what = "training scalars" if name == "scalars.jsonl" else \
                "sampled responses (they are logged every logging.sample_every steps)"
            run.notes.append(f"No {name} yet: no {what} to show.")
            continue
        records, torn = read_jsonl(path)
        if torn:
            run.notes.append(f"The last line of {name} is cut off (the run is still writing it, or stopped "
                             f"mid-write); it is left out.")
        if name == "samples.jsonl":
            run.samples = [r for r in records if isinstance(r.get("step"), int)]
        else:
            for record in records:
                if isinstance(record.get("step"), int):  # a resumed run appends: later values win
                    run.scalars.setdefault(record["step"], {}).update(record)
    return run


# ---- plots ---------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, count: int = 4, integer: bool = False) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    if integer:  # steps are whole numbers
        step = max(1, round(step))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def line_plot(title: str, series: list[tuple[str, list[tuple[int, float]]]], note: str = "",
              width: int = 380, height: int = 234) -> str:
    """An inline SVG line plot; a box saying so when no series has data."""
    left, right, top, bottom = 48, 10, 24, 58
    points = [p for _, pts in series for p in pts]
    head = (f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{html.escape(title)}"><text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{html.escape(title)}</text>')
    if not points:
        keys = ", ".join(label for label, _ in series)
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12" fill="#777">' \
                      f'not logged by this run ({html.escape(keys)})</text></svg>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.1, y1 + (abs(y1) or 1) * 0.1
    pad = (y1 - y0) * 0.06
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * ph

    parts = [head, f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbb"/>']
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="10">{_fmt(t)}</text>')
    for t in _ticks(x0, x1, integer=True):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 13}" text-anchor="middle" font-size="10">{_fmt(t)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{top + ph + 25}" text-anchor="middle" font-size="10" fill="#555">step</text>')
    legend_x, legend_y = left, top + ph + 38
    for i, (label, pts) in enumerate(series):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{path}"/>')
        if len(pts) <= 12:  # sparse series (e.g. evaluations) get markers
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        if pts:
            item = 18 + 5.6 * len(label)  # about the width of a 10px label
            if legend_x + item > width and legend_x > left:
                legend_x, legend_y = left, legend_y + 13
            parts.append(f'<rect x="{legend_x}" y="{legend_y - 4}" width="10" height="3" fill="{colour}"/>'
                         f'<text x="{legend_x + 13}" y="{legend_y}" font-size="10">{html.escape(label)}</text>')
            legend_x += item
    if note:
        parts.append(f'<text x="{left + pw - 4}" y="{top + 12}" text-anchor="end" font-size="10" fill="#777">{html.escape(note)}</text>')
    return "".join(parts) + "</svg>"


def scalar_plots(scalars: dict[int, dict]) -> str:
    steps = sorted(scalars)
    plots = []
    for title, keys, note in PLOTS:
        series = []
        for key, label in keys:
            pts = [(s, float(scalars[s][key])) for s in steps
                   if isinstance(scalars[s].get(key), (int, float)) and math.isfinite(scalars[s][key])]
            series.append((label, pts))
        plots.append(line_plot(title, series, note))
    return '<div class="plots">' + "".join(plots) + "</div>"


# ---- tokens ----------------------------------------------------------------------------------


def reward_colour(value: float, scale: float) -> tuple[str, bool]:
    """(CSS background, dark?) on the diverging scale: red < 0 < blue, white at 0, full at +-scale."""
    x = max(-1.0, min(1.0, value / scale))
    end = POSITIVE if x > 0 else NEGATIVE
    rgb = [round(255 + (c - 255) * abs(x)) for c in end]
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", abs(x) > 0.6


def colour_scale(samples: list[dict]) -> float:
    """The reward magnitude mapped to full colour: the 98th percentile of the nonzero |r| (so one
    outlier does not wash every other token out); 1 when every reward is zero."""
    values = sorted(abs(v) for s in samples for v in (s.get("process_rewards") or []) if v)
    if not values:
        return 1.0
    return values[min(len(values) - 1, int(0.98 * len(values)))]


def _signed(value) -> str:
    return "–" if value is None else f"{value:+.4g}"


def response_html(sample: dict, number: int, scale: float) -> str:
    outcome = float(sample.get("outcome", 0.0))
    correct = outcome >= 1.0 - 1e-9
    tokens, rewards, advantages = sample.get("tokens"), sample.get("process_rewards"), sample.get("advantages")
    if tokens is None:
        body = html.escape(sample.get("response", ""))
    else:
        spans = []
        for t, token in enumerate(tokens):
            text = html.escape(token)
            adv = f" · A={advantages[t]:+.4g}" if advantages and t < len(advantages) else ""
            if rewards is not None and t < len(rewards):
                background, dark = reward_colour(rewards[t], scale)
                ink = ";color:#fff" if dark else ""
                spans.append(f'<span class="tok" style="background:{background}{ink}" '
                             f'title="{html.escape(repr(token))} · r={rewards[t]:+.4g}{adv}">{text}</span>')
            else:
                spans.append(f'<span class="ptok" title="{html.escape(repr(token))}{adv}">{text}</span>')
        body = "".join(spans)
    length = len(tokens) if tokens is not None else len(sample.get("response", ""))
    unit = "tokens" if tokens is not None else "characters"
    flags = " · truncated" if sample.get("truncated") else ""
    classes = "correct" if correct else "incorrect"
    flip = ""
    if sample.get("flipped"):
        classes += " flipped"
        # the direction from the advantage's sign: with partial scores "correct" is not the outcome term's sign
        pushed = ("pushed down against its outcome" if (sample.get("advantage") or 0.0) < 0
                  else "pushed up against its outcome")
        flip = f' · <span class="flip" title="mean advantage and outcome term of opposite signs">⚠ {pushed}</span>'
    return (f'<div class="response {classes}" data-outcome="{outcome:g}">'
            f'<div class="rhead">#{number} <span class="verdict">{"✓ correct" if correct else "✗ incorrect"}</span>'
            f' · outcome {outcome:.2f} · sequence reward {_signed(sample.get("sequence_reward"))}'
            f' · advantage {_signed(sample.get("advantage"))} · {length} {unit}{flags}{flip}</div>'
            f'<div class="tokens">{body}</div></div>')


def groups_of(samples: list[dict]) -> list[list[dict]]:
    """Samples of one step grouped by prompt, in the order logged."""
    groups: dict = {}
    for s in samples:
        groups.setdefault((s.get("group"), s.get("prompt")), []).append(s)
    return list(groups.values())


def build_page(run_dir: str, step: int | None = None, max_prompts: int = 32) -> tuple[str, dict]:
    """(HTML, counts) for a run; counts: step, prompts, responses, coloured tokens."""
    run = read_run(run_dir)
    notes = list(run.notes)
    sample_steps = sorted({s["step"] for s in run.samples})
    chosen: list[dict] = []
    if step is not None and step not in sample_steps:
        raise ReportError(f"{run.log_dir}/samples.jsonl has no samples of step {step}; "
                          f"steps with samples: {sample_steps or 'none yet'}")
    if sample_steps:
        step = sample_steps[-1] if step is None else step
        chosen = [s for s in run.samples if s["step"] == step]
    groups = groups_of(chosen)
    if len(groups) > max_prompts:
        notes.append(f"Showing the first {max_prompts} of the step's {len(groups)} prompts (--max-prompts).")
        groups = groups[:max_prompts]
    shown = [s for g in groups for s in g]
    if shown and all(s.get("process_rewards") is None for s in shown):
        notes.append("This run has no process rewards (an outcome-only estimator): tokens are not coloured; "
                     "the advantage is the outcome baseline's.")
    if shown and any(s.get("tokens") is None for s in shown):
        notes.append("Some samples carry no token strings (logged by an older version): their text is shown "
                     "uncoloured.")
    if shown and any(s.get("tokens") is not None and s.get("process_rewards") is not None
                     and len(s["tokens"]) != len(s["process_rewards"]) for s in shown):
        notes.append("Some samples have a different number of tokens and process rewards: only the tokens "
                     "that have a reward are coloured.")
    scale = colour_scale(shown)
    coloured = sum(min(len(s["tokens"]), len(s["process_rewards"])) for s in shown
                   if s.get("tokens") is not None and s.get("process_rewards") is not None)

    steps = sorted(run.scalars)
    meta = [f"{len(steps)} scalar records up to step {steps[-1]}" if steps else "no scalars yet",
            f"samples at steps {', '.join(map(str, sample_steps))}" if sample_steps else "no samples yet"]
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>PRIME run {html.escape(run.log_dir)}</title><style>{STYLE}</style></head><body>",
             f"<h1>PRIME run <code>{html.escape(run.log_dir)}</code></h1>",
             f'<p class="meta">{" · ".join(meta)}</p>',
             '<div class="notes">' + "".join(f"<p>{html.escape(n)}</p>" for n in notes) + "</div>",
             "<h2>Training scalars</h2>", scalar_plots(run.scalars)]
    if shown:
        correct = sum(float(s.get("outcome", 0)) >= 1.0 - 1e-9 for s in shown)
        flipped = sum(bool(s.get("flipped")) for s in shown)
        parts += [
            f"<h2>Responses of step {step}: {len(groups)} prompts, {len(shown)} responses</h2>",
            '<div class="legend"><span>implicit process reward r<sub>t</sub> = β·(log π<sub>φ</sub> − log π<sub>ref</sub>)</span>'
            f'<span>{-scale:+.3g}</span><span class="bar" style="background:linear-gradient(to right, '
            f'rgb{NEGATIVE}, #fff, rgb{POSITIVE})"></span><span>{scale:+.3g}</span>'
            '<span class="meta">(beyond ±that: full colour; hover a token for its values)</span></div>',
            '<div class="filters">'
            f'<button class="on" data-filter="all">all ({len(shown)})</button>'
            f'<button data-filter="correct">correct ({correct})</button>'
            f'<button data-filter="incorrect">incorrect ({len(shown) - correct})</button>'
            f'<button data-filter="flipped" title="advantage against the outcome">flipped ({flipped})</button></div>',
        ]
        for group in groups:
            mean = sum(float(s.get("outcome", 0)) for s in group) / len(group)
            parts.append(f'<div class="group"><div class="prompt">{html.escape(str(group[0].get("prompt", "")))}</div>'
                         f'<div class="ghead">{len(group)} responses · mean outcome {mean:.2f}</div>'
                         + "".join(response_html(s, i + 1, scale) for i, s in enumerate(group)) + "</div>")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    counts = {"step": step, "prompts": len(groups), "responses": len(shown), "coloured_tokens": coloured}
    return "".join(parts), counts


def write_page(run_dir: str, out: str | None = None, step: int | None = None, max_prompts: int = 32) -> tuple[str, dict]:
    page, counts = build_page(run_dir, step, max_prompts)
    out = out or os.path.join(find_log_dir(run_dir), "report.html")
    write_atomic(out, page)
    return out, counts
