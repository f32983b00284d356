"""``megatron-prime inspect``: the process-reward page of a real (short) PRIME run, rendered in
headless Chromium; the DOM's responses and coloured tokens are counted against samples.jsonl.

The test installs Debian's chromium with apt-get when it is absent (as scripts/setup.sh does for
bubblewrap). The screenshot lands in the test's temporary directory (path printed with -s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from megatron_prime.data.toy import SPECIAL_TOKENS
from megatron_prime.reports import commands
from megatron_prime.reports.page import write_page
from tests.helpers import ROOT, make_trainer_fixture, overrides

pytestmark = pytest.mark.slow

TRAIN = f"""
import sys
sys.path.insert(0, {ROOT!r})
from tests.helpers import register_test_verifier
from megatron_prime.config import load_config
from megatron_prime.training.trainer import train
if __name__ == "__main__":
    register_test_verifier()
    train(load_config(None, sys.argv[1:]))
"""


class Counter(HTMLParser):
    """Counts responses (by verdict, and hidden ones) and coloured / plain token spans."""

    def __init__(self):
        super().__init__()
        self.responses = self.correct = self.flipped = self.hidden_responses = self.coloured = self.plain = 0
        self.external = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "div" and "response" in classes:
            self.responses += 1
            self.correct += "correct" in classes
            self.flipped += "flipped" in classes
            self.hidden_responses += "hidden" in a
        if tag == "span" and "tok" in classes:
            assert a["style"].startswith("background:rgb(")
            self.coloured += 1
        if tag == "span" and "ptok" in classes:
            self.plain += 1
        if tag in ("link", "img", "iframe") or (tag == "script" and "src" in a):
            self.external.append(tag)


def count(html_text: str) -> Counter:
    counter = Counter()
    counter.feed(html_text)
    return counter


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if shutil.which("apt-get") is None:
            pytest.skip("chromium is not installed and there is no apt-get to install it")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        exe = shutil.which("chromium")
    return exe


def headless(url: str, profile: str, *action: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", f"--user-data-dir={profile}", *action, url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two PRIME steps of the tiny trainer fixture, samples logged at both; the PRM starts from a
    perturbed copy of the policy, so the process rewards are not zero."""
    root = str(tmp_path_factory.mktemp("inspect"))
    fixture = make_trainer_fixture(root)
    args = overrides(fixture, root, "train.steps=2", "logging.sample_every=1", "logging.tensorboard=false",
                     f"model.prm_hf_path={fixture['prm_hf']}", "checkpoint.export_hf=false")
    proc = subprocess.run([sys.executable, "-c", TRAIN, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return os.path.join(root, "logs")


def samples_of(log_dir: str, step: int) -> list[dict]:
    return [r for r in map(json.loads, open(os.path.join(log_dir, "samples.jsonl"))) if r["step"] == step]


def test_sample_records_carry_what_the_page_needs(run):
    records = samples_of(run, 1)
    assert len(records) == 8 * 4  # train.prompts_per_step x rollout.n
    for r in records:
        assert len(r["tokens"]) == len(r["process_rewards"]) == len(r["advantages"]) > 0
        assert r["sequence_reward"] == pytest.approx(sum(r["process_rewards"]))
        assert r["advantage"] == r["advantages"][0]
        # One string per token (the toy tokenizer: one character each; special tokens, which the
        # response text leaves out, by name), ending in eos unless cut off.
        text = "".join(t for t in r["tokens"] if t not in SPECIAL_TOKENS)
        assert text == r["response"] and (r["tokens"][-1] == "<eos>") == (not r["truncated"])
    assert any(v != 0.0 for r in records for v in r["process_rewards"])
    assert [r["group"] for r in records] == [g for g in range(8) for _ in range(4)]
    # flipped: the mean advantage against the sign of the RLOO outcome term (prime_rloo, Eq. 5)
    for g in range(8):
        group = records[4 * g: 4 * g + 4]
        for r in group:
            outcome_term = r["outcome"] - sum(o["outcome"] for o in group if o is not r) / 3
            mean_advantage = sum(r["advantages"]) / len(r["advantages"])
            assert r["flipped"] == (outcome_term != 0 and mean_advantage * outcome_term < 0)


def test_token_strings_keep_sentencepiece_spaces():
    """Decoding a SentencePiece token alone drops its leading space; in place it keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_prime.metrics import token_strings

    vocab = {"<unk>": 0, "<eos>": 1, "\u2581the": 2, "\u2581cat": 3, "s": 4, "\u2581sat": 5, ".": 6}
    core = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    prompt, *response = tokenizer("the cats sat.", add_special_tokens=False)["input_ids"]
    assert tokenizer.batch_decode([[t] for t in response]) == ["cat", "s", "sat", "."]
    assert token_strings(tokenizer, prompt, response + [1]) == [" cat", "s", " sat", ".", "<eos>"]


def test_page_in_headless_chromium(run, tmp_path):
    out, counts = write_page(run, str(tmp_path / "report.html"))
    records = samples_of(run, 1)  # the latest step with samples
    tokens = sum(len(r["process_rewards"]) for r in records)
    assert counts == {"step": 1, "prompts": 8, "responses": len(records), "coloured_tokens": tokens}
    page = open(out).read()
    source = count(page)
    assert (source.responses, source.coloured, source.plain) == (len(records), tokens, 0)
    # Self-contained: nothing fetched from anywhere.
    assert source.external == [] and not re.search(r"https?://|url\(|@import", page)
    assert page.count("<svg") == 7

    profile = str(tmp_path / "profile")
    dom = count(headless(f"file://{out}", profile, "--dump-dom").stdout)
    assert (dom.responses, dom.coloured, dom.plain, dom.hidden_responses) == (len(records), tokens, 0, 0)
    correct = sum(r["outcome"] >= 1.0 for r in records)
    assert dom.correct == correct
    # The filter (opened as report.html#incorrect) hides every correct response.
    filtered = count(headless(f"file://{out}#incorrect", profile, "--dump-dom").stdout)
    assert filtered.hidden_responses == correct and filtered.responses == len(records)
    # ... and report.html#flipped every response whose advantage agrees with its outcome.
    flipped = sum(bool(r["flipped"]) for r in records)
    assert dom.flipped == flipped
    filtered = count(headless(f"file://{out}#flipped", profile, "--dump-dom").stdout)
    assert filtered.hidden_responses == len(records) - flipped

    shot = tmp_path / "report.png"
    headless(f"file://{out}", profile, f"--screenshot={shot}", "--window-size=1280,1600")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    print(f"screenshot: {shot}")


def test_run_in_progress_outcome_only_and_bad_step(run, tmp_path, capsys):
    live = tmp_path / "live"
    shutil.copytree(run, live)
    with open(live / "samples.jsonl", "a") as f:
        f.write('{"step": 2, "group": 0, "prompt": "1+')  # the trainer is still writing this line
    assert commands.inspect([str(live), "--step", "0", "--out", str(tmp_path / "live.html")]) == 0
    page = (tmp_path / "live.html").read_text()
    assert "The last line of samples.jsonl is cut off" in page
    assert count(page).responses == len(samples_of(run, 0))
    assert f"file://{tmp_path / 'live.html'}" in capsys.readouterr().out

    # An outcome-only run logs no process rewards: a note, and no coloured token.
    outcome_only = tmp_path / "outcome_only"
    outcome_only.mkdir()
    with open(outcome_only / "samples.jsonl", "w") as f:
        for r in samples_of(run, 1):
            f.write(json.dumps(dict(r, process_rewards=None, sequence_reward=None)) + "\n")
    scalars = [json.loads(line) for line in open(os.path.join(run, "scalars.jsonl"))]
    with open(outcome_only / "scalars.jsonl", "w") as f:
        for s in scalars:
            f.write(json.dumps({k: v for k, v in s.items() if not k.startswith(("prm/", "process_reward/"))}) + "\n")
    out, counts = write_page(str(outcome_only))
    page = open(out).read()
    assert counts["coloured_tokens"] == 0 and count(page).plain == sum(len(r["tokens"]) for r in samples_of(run, 1))
    assert "no process rewards (an outcome-only estimator)" in page and "not logged by this run" in page

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "scalars.jsonl").write_text("")
    out, counts = write_page(str(empty))
    assert counts["responses"] == 0 and "No samples.jsonl yet" in open(out).read()

    assert commands.inspect([run, "--step", "7", "--out", str(tmp_path / "x.html")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {run}/samples.jsonl has no samples of step 7; "
                                               "steps with samples: [0, 1]")
    assert commands.inspect([str(tmp_path / "nowhere")]) == 2
    assert "no scalars.jsonl or samples.jsonl here" in capsys.readouterr().err
