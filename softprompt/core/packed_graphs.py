"""CUDA graphs of the frozen base's packed forward and backward, for training on a GPU.

A step of the seed's recipe (8 rows, ~1,300 tokens) keeps an H200 busy ~18 ms, while launching the base's
kernels (24 layers forward and backward, a few dozen kernels each, through torch.compile's wrappers) costs
the host ~40 ms of Python: the step waits on the host, and so on how fast the machine's CPU is. A CUDA graph
launches a whole recorded forward, or backward, at once.

`PackedGraphs` records the packed stack (`hf/backbone.py::packed_stack`: the mask, the prefix cache, the
layers, the final norm) with `torch.cuda.make_graphed_callables`, one forward graph and one backward graph
for each micro-batch shape it meets, and replays them for later micro-batches of that shape. What stays out
of the graphs is small: the embeddings and the prompts before, the LM head and its loss after.

All shapes record into one memory pool. That is safe because training runs a micro-batch's forward and then
its backward before the next forward: the graphs' working memory is never needed by two of them at once.
Their static outputs do live in the pool, so the gradients a backward hands on are copied out at once
(`_GradOutOfPool`), before another graph can overwrite them.

Graphs are used only where they pay (micro-batches of at most `MAX_SLOTS` slots) and compute what the eager
stack computes: training with grad, on CUDA, a frozen base, no gradient checkpointing (its recomputation is a
backward-time forward). Anything else, a shape past `max_shapes`, or a recording that fails (logged once) runs
the eager stack.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from softprompt.hf.backbone import packed_stack

logger = logging.getLogger(__name__)

# Graphs pay where launching a micro-batch's kernels takes the host longer than the GPU takes to run them. On an
# H200 with a 1.4B base: the seed's 8 rows (~2,000 slots) ran 1.3-1.9x faster with graphs, while batch 32 (~5,000-
# 9,000 slots in a micro-batch, a new shape every few steps, each recorded at the cost of three forwards and
# backwards) ran 1.6x slower and reserved 1.5x the memory (BENCHMARKS.md, run 11; the speed part of that
# comparison was biased against graphs by the bench's clock of the time, run 13: to be measured again).
MAX_SLOTS = 4096


def no_autocast_cache(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast as it is, without its weight cache, which a CUDA graph cannot record. The packed stack always
    runs in this state (`core/packing.py`), graphed or not: torch.compile guards on it, and a layer traced in one
    state is traced again in the other. The cache keeps casts of trainable weights; the frozen base has none, so
    what is computed is the same."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class _GradOutOfPool(torch.autograd.Function):
    """Identity; its backward copies the gradient, which a graph's backward leaves in the shared pool."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


class PackedGraphs:
    """Callable as `packed_stack` minus the model: the hidden states `(R, T, D)`, or None where no graph
    applies (the caller then runs `packed_stack` itself)."""

    def __init__(self, base: nn.Module, max_slots: int = MAX_SLOTS, max_shapes: int = 32, warmup: int = 2,
                 device_type: str = "cuda"):
        self.base = base
        self.device_type = device_type  # tests on a CPU name "cpu", with a stand-in recorder
        self.max_slots = max_slots
        self.max_shapes = max_shapes
        self.warmup = warmup
        self.graphs: dict[tuple, object] = {}  # shape key -> graphed callable, or None where recording failed
        self.pool = None
        self.replays = 0  # micro-batches that ran from a graph (a bench reads it)
        # what `applies` reads every step, found once (walking the model's modules each step costs milliseconds)
        self._checkpointable = [m for m in base.modules() if hasattr(m, "gradient_checkpointing")]
        self._weights = list(base.parameters())

    def applies(self, inputs_embeds: torch.Tensor, key_values: torch.Tensor | None) -> str | None:
        """Why no graph runs this micro-batch; None when one does."""
        if inputs_embeds.device.type != self.device_type:
            return f"not on a {self.device_type} device"
        if inputs_embeds.shape[0] * inputs_embeds.shape[1] > self.max_slots:
            return f"more than {self.max_slots} slots: the GPU's work outlasts the launches"
        if not torch.is_grad_enabled():
            return "no gradient is taken"
        if not (inputs_embeds.requires_grad or (key_values is not None and key_values.requires_grad)):
            return "nothing in the stack needs a gradient"
        if any(m.gradient_checkpointing for m in self._checkpointable):
            return "gradient checkpointing recomputes the layers during the backward"
        if any(p.requires_grad for p in self._weights):
            return "the base model has trainable weights"
        return None

    def __call__(self, inputs_embeds, segment_ids, position_ids, token_adapter, prefix_owner, prefix_positions,
                 key_values=None):
        if self.applies(inputs_embeds, key_values) is not None:
            return None
        args = (inputs_embeds, segment_ids, position_ids, token_adapter, prefix_owner, prefix_positions)
        if key_values is not None:
            args += (key_values,)
        autocast = torch.is_autocast_enabled(self.device_type)
        key = (tuple((tuple(a.shape), a.dtype, a.requires_grad) for a in args), autocast,
               torch.get_autocast_dtype(self.device_type) if autocast else None, self.base.training)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_shapes:
                return None
            self.graphs[key] = self._record(args)
        graphed = self.graphs[key]
        if graphed is None:
            return None
        self.replays += 1
        return graphed(*(_GradOutOfPool.apply(a) if a.requires_grad else a for a in args))

    def _record(self, args):
        def stack(*tensors):
            return packed_stack(self.base, *tensors)

        # sample inputs as the real ones are (requires_grad included); make_graphed_callables runs them first
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:  # under `no_autocast_cache`, as `packed_forward` runs the stack, graphed or not
            return torch.cuda.make_graphed_callables(stack, samples, num_warmup_iters=self.warmup, pool=self.pool)
        except Exception as error:  # noqa: BLE001 - any failure: run this shape eagerly, say so once
            shape = "x".join(map(str, args[0].shape))
            logger.warning("CUDA graphs: recording the packed stack failed for micro-batches of %s (%s: %s); "
                           "they run without graphs", shape, type(error).__name__, error)
            return None
