"""Routing replay for a mixture-of-experts policy (R2; Zheng et al. 2025, GSPO, arXiv 2507.18071):
the experts every token was routed to in the old-log-prob pass are recorded, and the policy update's
passes use them again, so that the PPO ratio pi_theta / pi_theta_old compares the same experts (top-k
routing is discontinuous: after an update, or with nondeterministic kernels, a token near a tie
changes experts and its ratio jumps). The router still computes its scores, and the probabilities of
the replayed experts come from them (megatron-core's ``RouterReplay``), so the router keeps learning.
With R3 (``engine_routes``) the routes replayed in both passes are the ones the rollout engine took
while sampling, so the trainer's log-probs are those of the experts the samples came from.

Routes are kept per response row, whatever the micro-batches of a pass: ``routes`` is
``[rows, MoE layers of this pipeline stage, sequence, k]`` (the batch's ``extras["routes"]``, which
follow its rows into mini-batches). A router sees the tokens of a micro-batch as ``[s, b]`` flattened
(``s`` split over TP ranks under sequence parallelism), so recording gathers the sequence over TP and
replaying takes this rank's part of it.

Every pass also counts how many routes the router's own top-k would choose differently from the
recorded ones (``flipped``): with replay on, the drift it prevented; off, the drift there was.
"""

from __future__ import annotations

import base64

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction


class TrackedReplay(RouterReplay):
    """megatron-core's RouterReplay that also keeps the router's own top-k while it replays."""

    natural_topk_idx: torch.Tensor | None = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
            self.natural_topk_idx = default_compute_topk(scores, topk, num_groups, group_topk)[1]
        return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)


def stage_layers(model) -> list[int]:
    """The global (0-based) layer index of every router of this pipeline stage, in order."""
    return [router.layer_number - 1 for router in routers(model)]


def engine_routes(encoded: list[str | None], seq_lens: list[int], *, num_layers: int, num_experts: int,
                  topk: int, layers: list[int], width: int) -> torch.Tensor:
    """R3 (rollout routing replay, arXiv 2510.11370): the experts the engine routed every token to,
    in the layout the policy's passes replay, ``[rows, len(layers), width, topk]`` int16.

    Row ``i``'s ``encoded`` is SGLang's ``meta_info["routed_experts"]``: base64 of int32
    ``[seq_lens[i] - 1, num_layers, topk]``, positions 0 .. seq_len - 2 of prompt + response (the
    last token is never fed back). That last position, whose output no log-prob reads, and the
    padding repeat the last route given (a replayed route must name real experts). ``layers``: the
    global layers of this pipeline stage."""
    out = torch.zeros(len(encoded), len(layers), width, topk, dtype=torch.int16)
    for i, (text, seq_len) in enumerate(zip(encoded, seq_lens)):
        if text is None:
            raise ValueError(f"rollout row {i}: the engine returned no routed experts")
        ids = np.frombuffer(base64.b64decode(text), dtype=np.int32)
        expected = (seq_len - 1) * num_layers * topk
        if ids.size != expected:
            raise ValueError(f"rollout row {i}: the engine returned {ids.size} routed-expert ids, expected "
                             f"(prompt + response - 1 = {seq_len - 1}) x {num_layers} layers x top-{topk} = {expected}")
        if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
            raise ValueError(f"rollout row {i}: routed-expert ids outside 0..{num_experts - 1} "
                             f"({int(ids.min())}..{int(ids.max())})")
        routes = torch.from_numpy(ids.reshape(seq_len - 1, num_layers, topk)[:, layers].copy())
        if routes.shape[0] == 0:  # a one-token sequence: nothing routed that a log-prob reads
            routes = torch.arange(topk, dtype=torch.int32).expand(1, len(layers), topk)
        filled = torch.cat([routes, routes[-1:].expand(width - routes.shape[0], -1, -1)]) if width > routes.shape[0] \
            else routes[:width]
        out[i] = filled.transpose(0, 1).to(torch.int16)
    return out


def install(model) -> None:
    """Give every router of ``model`` (built with ``moe_enable_routing_replay``) a ``TrackedReplay``."""
    for router in routers(model):
        RouterReplay.global_router_replay_instances.remove(router.router_replay)
        router.router_replay = TrackedReplay()


def routers(model) -> list:
    """This stage's routers that can record and replay, in layer order."""
    return [m for m in model.modules() if getattr(m, "router_replay", None) is not None]


class RoutePass:
    """The routers during one pass over a batch's rows, in one of three modes:

    * ``record``: keep the experts chosen for every token (``routes``);
    * ``replay``: use the batch's recorded routes (``extras["routes"]``) instead of choosing;
    * ``observe``: choose freely, and count where that differs from the recorded routes.
    """

    def __init__(self, model, mode: str, num_rows: int, width: int, device):
        self.routers = routers(model)
        self.mode = mode
        self.routes = None
        if mode == "record" and self.routers:  # int16: 2 bytes per (token, layer, choice)
            k = model.config.moe_router_topk
            self.routes = torch.zeros(num_rows, len(self.routers), width, k, dtype=torch.int16, device=device)
        self.flipped = self.compared = 0

    def before(self, mb: dict) -> None:
        """Set the routers up for micro-batch ``mb``."""
        s = mb["input_ids"].shape[1]
        for layer, router in enumerate(self.routers):
            replay = router.router_replay
            replay.clear_indices()
            if self.mode != "replay":
                replay.set_router_replay_action(RouterReplayAction.RECORD)
                continue
            tokens = _local_sequence(_frame(mb["batch"].extras["routes"][:, layer], s), router)  # [s_local, b, k]
            replay.set_target_indices(tokens.reshape(-1, tokens.shape[-1]).to(mb["input_ids"].device))
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def after(self, mb: dict, rows: torch.Tensor) -> None:
        """What the routers chose for micro-batch ``mb`` (rows ``rows`` of the pass's batch)."""
        b, s = mb["input_ids"].shape
        for layer, router in enumerate(self.routers):
            replay = router.router_replay
            own = replay.natural_topk_idx if self.mode == "replay" else replay.get_recorded_indices()
            chosen = _full_sequence(own.view(-1, b, own.shape[-1]), router)  # [s, b, k]
            if self.mode == "record":
                width = min(s, self.routes.shape[2])
                self.routes[rows.to(self.routes.device), layer, :width] = chosen[:width].transpose(0, 1).to(torch.int16)
            else:
                # positions whose recorded route is real (R3: the engine's; its last position is filled in)
                known = mb["batch"].extras.get("routes_known", mb["batch"].attention_mask)
                self._count(chosen, _frame(mb["batch"].extras["routes"][:, layer], s), known, s)
            replay.clear_indices()
            replay.clear_router_replay_action()

    def _count(self, chosen: torch.Tensor, recorded: torch.Tensor, known: torch.Tensor, s: int) -> None:
        """Routes (token x layer) whose set of experts differs from the recorded one, at the
        positions ``known`` ``[b, width]`` marks (real tokens with a recorded route)."""
        real = _frame(known[:, :, None], s)[..., 0].bool().to(chosen.device)  # [s, b]
        differs = (chosen.sort(-1).values != recorded.to(chosen.device).sort(-1).values).any(-1) & real
        self.flipped += int(differs.sum())
        self.compared += int(real.sum())

    def finish(self) -> None:
        for router in self.routers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()


def _frame(per_row: torch.Tensor, s: int) -> torch.Tensor:
    """``[b, width, ...]`` per row -> ``[s, b, ...]`` (cut or zero-padded to the micro-batch's ``s``),
    the router's token order."""
    pad = [0, 0] * (per_row.dim() - 2) + [0, max(0, s - per_row.shape[1])]
    return torch.nn.functional.pad(per_row, pad)[:, :s].transpose(0, 1).long()


def _local_sequence(tokens: torch.Tensor, router) -> torch.Tensor:
    """This TP rank's part of the sequence under sequence parallelism (the router's input)."""
    if not router.config.sequence_parallel:
        return tokens
    tp = parallel_state.get_tensor_model_parallel_world_size()
    chunk = tokens.shape[0] // tp
    start = parallel_state.get_tensor_model_parallel_rank() * chunk
    return tokens[start:start + chunk]


def _full_sequence(tokens: torch.Tensor, router) -> torch.Tensor:
    """The whole sequence's routes ``[s, b, k]`` from this TP rank's part (sequence parallelism)."""
    if not router.config.sequence_parallel:
        return tokens
    return tensor_parallel.gather_from_sequence_parallel_region(tokens, tensor_parallel_output_grad=False)
