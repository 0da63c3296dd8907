"""Zero-valued loss terms that keep every trainable parameter in the graph, so ZeRO ranks stay in step."""

from __future__ import annotations

import torch


def zero_touch(*tensors: torch.Tensor) -> torch.Tensor:
    """A float32 scalar equal to 0 that depends on every given tensor: add it to the loss.

    Why: a DeepSpeed ZeRO step reduces gradients bucket by bucket, and each rank decides which
    buckets are ready from the parameters that received a gradient in its own backward. Ranks draw
    different batch kinds (robot or vision-language, with or without a wrist camera ...) and each kind
    leaves some modules idle: the LM head on robot batches, the action head and state encoder on VL
    batches, the CLIP projection without a CLIP term. A parameter that gets no gradient on one rank
    but a gradient on another makes the ranks issue different collectives, and the step hangs or
    reduces mismatched buckets. Running each idle module on a token and adding `0 * output` gives it
    an exact zero gradient, so every rank produces the same gradient set whatever batch it drew,
    while neither the loss value nor any gradient changes (adding 0.0 is exact).

    Pass the outputs of the idle modules (any shapes and dtypes); the value is `0.0 * sum(t.sum())`.
    """
    if not tensors:
        raise ValueError("zero_touch needs at least one tensor to keep in the graph")
    total = tensors[0].float().sum()
    for tensor in tensors[1:]:
        total = total + tensor.float().sum()
    return 0.0 * total
