"""Deterministic prompt batches with a checkpointable cursor.

Epoch e visits the rows in a permutation fixed by (seed, e); the cursor is (epoch, position in
that permutation). Saving and restoring the cursor therefore replays exactly the prompts an
uninterrupted run would have seen. A batch that reaches the end of an epoch is completed from the
start of the next one, so every batch is full.
"""

from __future__ import annotations

import random
from typing import Sequence

from megatron_prime.data.schema import PromptRow


class PromptSampler:
    def __init__(self, rows: Sequence[PromptRow], batch_size: int, seed: int = 0):
        if not rows:
            raise ValueError("PromptSampler needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            order = list(range(len(self.rows)))
            # A string seed hashes identically in every process and Python version (no PYTHONHASHSEED).
            random.Random(f"prompt-sampler/{self.seed}/{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_batch(self, size: int | None = None) -> list[PromptRow]:
        """The next ``size`` rows (default ``batch_size``) of the stream."""
        size = self.batch_size if size is None else size
        batch = []
        while len(batch) < size:
            order = self._permutation(self.epoch)
            take = min(size - len(batch), len(order) - self.position)
            batch += [self.rows[i] for i in order[self.position : self.position + take]]
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        # Resuming over a different dataset or seed would silently change the prompt stream.
        if state["num_rows"] != len(self.rows) or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['num_rows']} rows with seed {state['seed']}, "
                f"but this sampler has {len(self.rows)} rows with seed {self.seed}"
            )
        if not 0 <= state["position"] < len(self.rows) or state["epoch"] < 0:
            raise ValueError(f"invalid sampler cursor {state}")
        self.epoch, self.position = state["epoch"], state["position"]
