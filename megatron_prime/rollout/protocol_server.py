"""A rollout server for CPUs: the hf engine behind the part of SGLang's HTTP protocol that the
trainer's remote mode uses (``sglang_remote.SGLangRemoteEngine``), so that remote mode and its
one-step-off rollouts run end to end on a machine without GPUs (the demo with
``rollout.max_staleness=1``, the tests) and beside sglang-router.

It is the receiving side of SGLang 0.5.23 as read in its source, not SGLang itself:

* ``/generate``: rows of ``input_ids`` with one sampling dict each (``sampling_seed`` seeds the
  row), answered as SGLang does: ``output_ids``, ``text``, ``meta_info.finish_reason.type`` and
  ``meta_info.output_token_logprobs`` as ``(logprob, token_id, None)``.
* ``/generate`` with ``return_routed_experts`` (R3, a mixture-of-experts model):
  ``meta_info.routed_experts``, the experts transformers' routers chose for positions 0 .. len - 2
  of prompt + response, as SGLang encodes them (base64 int32 ``[positions, layers, top-k]``); taken
  from a teacher-forced forward of the finished sequence, the same weights and tokens.
* ``/init_weights_update_group``: joins the trainer's broadcast group as rank ``rank_offset``
  (one TP rank per server) with ``join_broadcast_group``, the torch calls SGLang's
  ``init_custom_process_group`` makes (a ``tcp://`` rendezvous, the store keyed by the group
  name, a group outside any default world; checked in tests/rollout/test_sglang_contract.py).
* ``/update_weights_from_distributed`` with ``load_format="flattened_bucket"``: allocates the
  bucket's bytes from (names, dtypes, shapes) back to back, receives one broadcast from rank 0,
  and loads the tensors.
* what sglang-router asks of a worker when it registers: ``/health``, ``/server_info`` and
  ``/model_info`` (the model and tokenizer directory); one request per row is answered with one
  dict, as SGLang does (the router forwards a single ``sampling_params`` dict, not a list).
* ``/begin_weight_update``, ``/end_weight_update``, ``/flush_cache``,
  ``/destroy_weights_update_group``, and ``/get_weights_by_name`` (SGLang's debugging route, used
  by tests to read what a server holds).

Run: ``python -m megatron_prime.rollout.protocol_server --model HF_DIR --port PORT`` (or
``local_server(HF_DIR)`` from Python, which starts one on a free port and stops it afterwards).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.distributed as dist

from megatron_prime.rollout.base import SamplingParams
from megatron_prime.rollout.hf_engine import HFEngine
from megatron_prime.rollout.sglang_remote import join_broadcast_group


class Server:
    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.engine = HFEngine(model_dir)
        self.lock = threading.Lock()  # one engine call at a time
        self.groups: dict[str, object] = {}

    # ---- routes -----------------------------------------------------------------------------

    def generate(self, body: dict) -> list[dict] | dict:
        rows, params = body["input_ids"], body["sampling_params"]
        if rows and not isinstance(rows[0], list):  # one request (what sglang-router forwards): one answer
            return self.generate({**body, "input_ids": [rows], "sampling_params": [params]})[0]
        if isinstance(params, dict):  # a batch sharing one sampling dict
            params = [params] * len(rows)
        outputs: list[dict | None] = [None] * len(rows)
        by_params: dict[str, list[int]] = {}  # rows that differ only in their seed run together
        for i, p in enumerate(params):
            key = json.dumps({k: v for k, v in p.items() if k != "sampling_seed"}, sort_keys=True)
            by_params.setdefault(key, []).append(i)
        with self.lock:
            for key, indices in by_params.items():
                p = json.loads(key)
                sampling = SamplingParams(
                    n=1, temperature=p["temperature"], top_p=p["top_p"], top_k=p["top_k"],
                    max_new_tokens=p["max_new_tokens"], stop_token_ids=tuple(p["stop_token_ids"]),
                )
                seeds = [params[i].get("sampling_seed", 0) for i in indices]
                results = self.engine._generate_batch([rows[i] for i in indices], seeds, sampling)
                for i, (tokens, logprobs, reason) in zip(indices, results):
                    outputs[i] = {
                        "output_ids": tokens,
                        "text": self.engine._decode(tokens),
                        "meta_info": {
                            "finish_reason": {"type": reason},
                            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens)],
                        },
                    }
                    if body.get("return_routed_experts"):
                        if body.get("routed_experts_start_len", 0) != 0:
                            raise ValueError("routed_experts_start_len other than 0 is not served here")
                        outputs[i]["meta_info"]["routed_experts"] = routed_experts(self.engine.model, rows[i] + tokens)
        return outputs

    def init_weights_update_group(self, body: dict) -> dict:
        # The same torch calls as SGLang's side, checked against its source by the contract test.
        self.groups[body["group_name"]] = join_broadcast_group(
            body["master_address"], body["master_port"], body["world_size"], body["group_name"], body["backend"],
            timeout_s=300, rank=body["rank_offset"],
        )
        return {"success": True, "message": "joined"}

    def update_weights_from_distributed(self, body: dict) -> dict:
        assert body["load_format"] == "flattened_bucket", body["load_format"]
        layout, offset = [], 0
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            dtype = getattr(torch, dtype)
            size = torch.Size(shape).numel() * dtype.itemsize
            assert offset % dtype.itemsize == 0, f"unaligned {name}"
            layout.append((name, dtype, shape, offset, size))
            offset += size
        flat = torch.empty(offset, dtype=torch.uint8)
        dist.broadcast(flat, src=0, group=self.groups[body["group_name"]])
        tensors = [(name, flat[start:start + size].view(dtype).reshape(shape))
                   for name, dtype, shape, start, size in layout]
        with self.lock:
            self.engine.update_weights(tensors)
        return {"success": True, "message": f"loaded {len(tensors)} tensors"}

    def destroy_weights_update_group(self, body: dict) -> dict:
        dist.destroy_process_group(self.groups.pop(body["group_name"]))
        return {"success": True, "message": "destroyed"}

    def get_weights_by_name(self, body: dict) -> list:
        with self.lock:
            param = self.engine._params[body["name"]]
            return param.detach().reshape(-1)[: body.get("truncate_size", 100)].tolist()

    def model_info(self) -> dict:
        """What sglang-router reads when a worker registers (it loads the tokenizer from
        ``tokenizer_path``, a local directory here)."""
        return {"model_path": self.model_dir, "served_model_name": self.model_dir, "tokenizer_path": self.model_dir,
                "is_generation": True, "weight_version": "default", "model_type": self.engine.model.config.model_type,
                "architectures": self.engine.model.config.architectures, "has_image_understanding": False,
                "has_audio_understanding": False}

    def server_info(self) -> dict:
        return {"model_path": self.model_dir, "tokenizer_path": self.model_dir, "tp_size": 1, "dp_size": 1,
                "internal_states": [], "version": "0.5.23"}

    def routes(self):
        ok = lambda _body: {"success": True, "message": ""}  # noqa: E731
        return {
            "/generate": self.generate,
            "/begin_weight_update": ok,
            "/end_weight_update": ok,
            "/flush_cache": ok,
            "/init_weights_update_group": self.init_weights_update_group,
            "/update_weights_from_distributed": self.update_weights_from_distributed,
            "/destroy_weights_update_group": self.destroy_weights_update_group,
            "/get_weights_by_name": self.get_weights_by_name,
        }


@torch.no_grad()
def routed_experts(model, ids: list[int]) -> str:
    """The experts every position of ``ids`` but the last was routed to (what the next token's
    log-prob depends on), in SGLang's encoding: base64 of int32 ``[len - 1, layers, top-k]``."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    if not routers:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts routers: no routed experts to return")
    if len(ids) < 2:
        return ""
    chosen: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _in, out: chosen.append(out[2])) for r in routers]
    try:
        device = next(model.parameters()).device
        model(input_ids=torch.tensor([ids[:-1]], device=device))
    finally:
        for hook in hooks:
            hook.remove()
    routes = torch.stack(chosen, dim=1).to(torch.int32).cpu()  # [len - 1, layers, top-k], layer order
    return base64.b64encode(routes.numpy().tobytes()).decode()


def serve(model_dir: str, port: int) -> None:
    server = Server(model_dir)
    routes = server.routes()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._answer(200, "ok")
            elif self.path in ("/model_info", "/get_model_info"):
                self._answer(200, server.model_info())
            elif self.path in ("/server_info", "/get_server_info"):
                self._answer(200, server.server_info())
            else:
                self._answer(404, {"error": f"no route {self.path}"})

        def do_POST(self):  # noqa: N802
            route = routes.get(self.path)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if route is None:
                self._answer(404, {"error": f"no route {self.path}"})
                return
            try:
                self._answer(200, route(body))
            except Exception as exc:  # noqa: BLE001 - reported to the client, as SGLang does
                self._answer(400, {"success": False, "message": repr(exc)})

        def log_message(self, *args):  # quiet
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


@contextlib.contextmanager
def local_server(model_dir: str, *, cpu: int | None = None, timeout_s: float = 300.0):
    """A server for ``model_dir`` in a process of its own on a free loopback port (pinned to CPU
    core ``cpu`` if given); yields its URL, stops it on exit."""
    from megatron_prime.platform.distributed import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "megatron_prime.rollout.protocol_server", "--model", model_dir, "--port", str(port)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the rollout server for {model_dir} did not start (exit code "
                                       f"{proc.poll()}, {timeout_s:.0f} s)") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="an hf rollout engine behind SGLang's HTTP protocol (CPU)")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint dir")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    serve(args.model, args.port)
