"""The (sum, count) metric convention shared by the losses."""

import torch

from megatron_prime.algorithm import accumulate_metrics, metric, metric_means


def test_metrics_aggregate_exactly_across_micro_batches():
    # Micro-batch 1: clip fraction 1/4 over 4 tokens; micro-batch 2: 3/6 over 6 tokens.
    # Global mean = (1 + 3) / (4 + 6) = 0.4, not the mean of means (0.25 + 0.5) / 2 = 0.375.
    total = {}
    accumulate_metrics(total, {"policy/clip_frac": metric(torch.tensor(1.0), 4)})
    accumulate_metrics(total, {"policy/clip_frac": metric(torch.tensor(3.0), 6)})
    assert total["policy/clip_frac"].tolist() == [4.0, 10.0]
    assert metric_means(total) == {"policy/clip_frac": 0.4}
    # Nothing counted -> 0.0 rather than NaN.
    assert metric_means({"rollout/kl": metric(torch.tensor(0.0), 0)}) == {"rollout/kl": 0.0}


def test_metric_is_detached_float64():
    x = torch.tensor(2.0, requires_grad=True)
    m = metric(x * 3, 5)
    assert m.dtype == torch.float64 and not m.requires_grad and m.tolist() == [6.0, 5.0]
