"""``eval`` and ``score`` take Megatron checkpoints too: each is converted to HF once, under the
output dir, and reused. Two checkpoints with the same directory name (every trainer step's model
is ``step_N/policy``) must not share a conversion."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT, make_tiny_hf

CONVERT_TWICE = """
import sys
sys.path.insert(0, {root!r})
from safetensors.torch import load_file
from megatron_prime.bridge.convert import hf_to_mcore
from megatron_prime.platform import distributed
from megatron_prime.reports.engines import hf_checkpoint
distributed.setup()
hf = {{"step_1": {hf1!r}, "step_2": {hf2!r}}}
for step, source in hf.items():
    hf_to_mcore(source, {tmp!r} + "/" + step + "/policy")
for step in ("step_1", "step_2", "step_1"):
    out = hf_checkpoint({tmp!r} + "/" + step + "/policy", {tmp!r} + "/cache")
    got, want = load_file(out + "/model.safetensors"), load_file(hf[step] + "/model.safetensors")
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want), (step, out)
print("OK")
"""


def test_checkpoints_with_the_same_name_are_converted_apart(tmp_path):
    tmp = str(tmp_path)
    for seed in (0, 1):
        make_tiny_hf("qwen2", os.path.join(tmp, f"hf{seed}"), seed=seed)
    script = CONVERT_TWICE.format(root=ROOT, tmp=tmp, hf1=os.path.join(tmp, "hf0"), hf2=os.path.join(tmp, "hf1"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(os.listdir(os.path.join(tmp, "cache"))) == 2
