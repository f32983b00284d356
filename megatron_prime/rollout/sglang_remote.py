"""SGLang rollout engine on remote servers (disaggregated mode).

SGLang servers run on other nodes, optionally behind ``sglang-router``; they are reached
over HTTP. ``/generate`` goes to the router when one is given (else round-robin over the
workers); weight and cache routes go to every worker directly (the router has no weight
or memory routes). Weights travel by NCCL broadcast from the trainer's global rank 0 on
a group it forms with every TP rank of every server (``/init_weights_update_group``),
one flattened single-dtype bucket per ``/update_weights_from_distributed`` call.
Constructed by the trainer on global rank 0 only (``fleet/fleet.py``).

Written against SGLang ``SGLANG_VERSION`` (routes and bodies are in
``sglang_engine.SGLANG_HTTP_USED``, checked by ``tests/rollout/test_sglang_contract.py``, which
also checks that the server's group and bucket layout are what we mirror here). The
trainer side needs no sglang installed. Tested end to end on CPU (gloo) through the real
``sglang-router`` 0.3.2 against servers that speak this protocol with an hf engine behind them
(``protocol_server.py``); never run against real SGLang servers. The router takes
one sampling dict per ``/generate`` request (a list of them, one per row, it refuses with HTTP
422), so through it every sample, with its own seed, is its own request.
"""

from __future__ import annotations

import datetime
import itertools
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch

from .base import Response, RolloutEngine, RolloutError, SamplingParams, check_prompts, describe_request
from .sglang_engine import expand_requests, parse_output, routes_request
from .weight_buckets import DEFAULT_BUCKET_BYTES, bucket_meta, iter_buckets


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The bytes of a bucket's tensors, back to back: the layout SGLang's receiver allocates
    from (names, dtypes, shapes) (``FlattenedTensorBucket.empty``: each tensor's bytes at
    the running offset, no padding)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])


def join_broadcast_group(master_address: str, master_port: int, world_size: int, group_name: str,
                         backend: str, timeout_s: float, rank: int = 0):
    """Join, as ``rank`` (the trainer: 0), the process group the servers form in
    ``/init_weights_update_group``.

    Their side (``init_custom_process_group``) rendezvous at ``tcp://address:port`` (rank 0,
    us, hosts the store), keys the store under the group name, and builds a process group
    outside the default world whose ranks are its own ranks. This mirrors it with the same
    torch calls; a trainer process has its own default world, so the group must not be
    derived from it (no ``new_group``)."""
    from torch.distributed import distributed_c10d as c10d

    if c10d.is_initialized() and c10d._get_default_group().bound_device_id is not None:
        # torch would then build the group by splitting the trainer's own communicator.
        raise RuntimeError("the trainer's default process group is bound to a device (device_id=...); "
                           "the weight-broadcast group with remote servers cannot be formed")
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, _ = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), c10d.PrefixStore(group_name, store),
        group_name=group_name, timeout=timeout,
    )
    # Address the group by its own ranks (src=0 is the trainer).
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class SGLangRemoteEngine(RolloutEngine):
    """``worker_urls``: every SGLang server (``http://host:port``), each with ``tp_size``
    GPUs. ``router_url``: the sglang-router in front of them, for ``/generate``.
    ``master_address``/``master_port``: where the trainer's rank 0 hosts the rendezvous of
    the weight-broadcast group (reachable from the servers).

    The trainer constructs it on global rank 0 only, which generates (HTTP) and sends
    the weights it receives from the bridge's export. ``sleep``/``wake`` do nothing:
    remote servers do not share GPUs with training. Requests time out after
    ``timeout_s`` seconds.
    """

    name = "sglang-remote"

    def __init__(
        self,
        worker_urls: list[str],
        tp_size: int,
        master_address: str,
        master_port: int,
        router_url: str | None = None,
        group_name: str = "megatron_prime_weights",
        timeout_s: float = 1800.0,
        samples_per_request: int = 64,
        max_concurrent_requests: int = 32,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        if not worker_urls:
            raise ValueError("sglang-remote engine: no worker_urls")
        self.workers = [u.rstrip("/") for u in worker_urls]
        self.router = router_url.rstrip("/") if router_url else None
        self.tp_size = tp_size
        self.master_address, self.master_port = master_address, master_port
        self.group_name = group_name
        self.timeout_s = timeout_s
        self.samples_per_request = samples_per_request
        self.bucket_bytes = bucket_bytes
        self._pool = ThreadPoolExecutor(max_workers=max(max_concurrent_requests, len(self.workers)))
        self._group = None  # broadcast group with the servers, formed on first update
        # NCCL between GPUs; gloo when the trainer runs on CPU (tests, debugging).
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"

    # ---- HTTP -----------------------------------------------------------------------------

    def _request(self, base: str, route: str, body: dict | None, method: str = "POST"):
        url = base + route
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise RolloutError(self.name, f"{method} {url}", f"HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise RolloutError(self.name, f"{method} {url}", f"no answer ({exc!r}); server down or timed out") from exc
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def _post(self, base: str, route: str, body: dict) -> object:
        result = self._request(base, route, body)
        if isinstance(result, dict) and result.get("success") is False:
            raise RolloutError(self.name, f"POST {base}{route}", f"SGLang answered failure: {result.get('message')}")
        return result

    def _get(self, base: str, route: str) -> object:
        return self._request(base, route, None, method="GET")

    def _on_all_workers(self, route: str, body: dict) -> None:
        for future in [self._pool.submit(self._post, w, route, body) for w in self.workers]:
            future.result()

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        """Block until every worker answers ``/health`` (servers take minutes to start)."""
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            while True:
                try:
                    self._get(worker, "/health")
                    break
                except RolloutError as exc:
                    if time.monotonic() > deadline:
                        raise RolloutError(self.name, f"GET {worker}/health", f"not ready after {timeout_s}s") from exc
                    time.sleep(2.0)

    # ---- generation -------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Response]:
        request = describe_request(prompt_token_ids, sampling)
        check_prompts(self.name, prompt_token_ids)
        input_ids, params, prompt_of_row = expand_requests(prompt_token_ids, sampling)
        chunks = []
        if self.router:
            # sglang-router takes one sampling dict per request (a list of them is refused, HTTP 422),
            # so each row, with its own seed, is its own request; the router spreads them.
            for row, p in zip(input_ids, params):
                body = {"input_ids": row, "sampling_params": p, "return_logprob": True, **routes_request(sampling)}
                chunks.append(self._pool.submit(self._post, self.router, "/generate", body))
        else:
            targets = itertools.cycle(self.workers)
            for start in range(0, len(input_ids), self.samples_per_request):
                rows = slice(start, start + self.samples_per_request)
                body = {"input_ids": input_ids[rows], "sampling_params": params[rows], "return_logprob": True,
                        **routes_request(sampling)}
                chunks.append(self._pool.submit(self._post, next(targets), "/generate", body))
        outs = []
        for future in chunks:
            try:
                result = future.result()
                outs.extend(result if isinstance(result, list) else [result])
            except RolloutError as exc:
                raise RolloutError(self.name, f"{request} via {exc.request}", exc.reason) from exc
        if len(outs) != len(input_ids):
            raise RolloutError(self.name, request, f"asked for {len(input_ids)} responses, got {len(outs)}")
        return [parse_output(self.name, request, out, p, sampling.return_routes) for out, p in zip(outs, prompt_of_row)]

    # ---- weights ------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Form the broadcast group: rank 0 is this trainer rank, then each server's TP
        ranks. The servers block in the HTTP call until the trainer joins, so the calls
        run in threads while this thread joins."""
        world_size = 1 + self.tp_size * len(self.workers)
        calls = [
            self._pool.submit(
                self._post,
                worker,
                "/init_weights_update_group",
                {
                    "master_address": self.master_address,
                    "master_port": self.master_port,
                    "rank_offset": 1 + i * self.tp_size,
                    "world_size": world_size,
                    "group_name": self.group_name,
                    "backend": self.backend,
                },
            )
            for i, worker in enumerate(self.workers)
        ]
        try:
            self._group = join_broadcast_group(self.master_address, self.master_port, world_size, self.group_name,
                                               self.backend, self.timeout_s)
        except Exception as exc:
            for call in calls:
                call.cancel()
            raise RolloutError(self.name, f"joining weight group at {self.master_address}:{self.master_port}",
                               repr(exc)) from exc
        for call in calls:
            call.result()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Broadcast the stream to every server, one single-dtype bucket per call. Tensors
        must be on this rank's GPU for NCCL (on the CPU for gloo)."""
        if self._group is None:
            self._connect()
        self._on_all_workers("/begin_weight_update", {})
        for bucket in iter_buckets(named_tensors, self.bucket_bytes):
            names, dtypes, shapes = bucket_meta(bucket)
            flat = flatten_bucket(bucket)
            body = {
                "names": names,
                "dtypes": dtypes,
                "shapes": shapes,
                "group_name": self.group_name,
                "flush_cache": False,
                "load_format": "flattened_bucket",
            }
            # Each server allocates the same byte layout and joins the broadcast from
            # inside this call, so post first, then send.
            calls = [self._pool.submit(self._post, w, "/update_weights_from_distributed", body) for w in self.workers]
            torch.distributed.broadcast(flat, src=0, group=self._group)
            for call in calls:
                call.result()
        self._on_all_workers("/end_weight_update", {})
        for worker in self.workers:  # old prefixes hold keys/values of the old weights
            self._post(worker, "/flush_cache", {})

    def sleep(self) -> None:
        """Nothing to release: remote servers keep their own GPUs."""

    def wake(self, tags=None) -> None:
        """Nothing to restore (see ``sleep``)."""

    def restart(self) -> None:
        """Servers are restarted by their launcher (SLURM job step); this waits until they
        answer again and drops the old broadcast group, re-formed at the next update."""
        if self._group is not None:
            try:
                self._on_all_workers("/destroy_weights_update_group", {"group_name": self.group_name})
            except RolloutError:
                pass  # a restarted server no longer knows the group
            torch.distributed.destroy_process_group(self._group)
            self._group = None
        self.wait_ready()

    def shutdown(self) -> None:
        if self._group is not None:
            torch.distributed.destroy_process_group(self._group)
            self._group = None
        self._pool.shutdown(wait=False, cancel_futures=True)
