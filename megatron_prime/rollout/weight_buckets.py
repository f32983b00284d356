"""Group the bridge's ``(hf_name, tensor)`` stream into buckets for transfer to an engine.

Buckets hold a single dtype. SGLang 0.5.23 rebuilds a received flattened bucket with
every tensor starting at a byte offset that is a multiple of its dtype size and rejects
the bucket otherwise; with one dtype per bucket (and offsets that are sums of whole
tensors) that always holds, with no padding to agree on.

Only one bucket is held at a time, so the transfer's extra memory is one bucket, not a
model copy. The stream's tensors must stay valid after the next one is produced (the
bridge yields fresh tensors, or views of the parameters where no gather or reordering is
needed, which nothing changes during a sync; consumers must not write into them).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of consecutive ``(name, tensor)`` pairs of one dtype whose total size
    stays within ``bucket_bytes``; a tensor larger than that travels alone. Order is kept."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (tensor.dtype != bucket[0][1].dtype or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def bucket_meta(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list[str], list[str], list[list[int]]]:
    """(names, dtype names as torch attribute names e.g. "bfloat16", shapes) of a bucket,
    the form both SGLang's and vLLM's receivers take."""
    names = [name for name, _ in bucket]
    dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
    shapes = [list(t.shape) for _, t in bucket]
    return names, dtypes, shapes
