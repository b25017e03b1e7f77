"""A whole training step (forward and backward) captured once and replayed as one CUDA graph.

At small crops the GPU finishes the trunk's kernels faster than Python can launch them: a
48-block "paper" Pairformer at 384 tokens issues tens of thousands of launches per step (forward,
checkpoint recompute and backward) and the host, not the GPU, sets the step time. A replayed
graph issues the same kernels with one call.

    step = GraphedStep(lambda: train_step(static_batch), parameters=model.parameters())
    for batch in batches:
        copy_into(static_batch, batch)   # same shapes, same tensors: the graph reads them
        loss = step()                    # the captured outputs, rewritten by each replay
        optimizer.step()                 # reads the gradients the replay wrote

Rules of a captured step (those of ``torch.cuda.graph``):
- fixed shapes; inputs are the tensors the step read while it was captured (copy new data into
  them), and its outputs and the parameters' ``.grad`` are rewritten in place by each replay;
- no host synchronisation inside (``.item()``, printing values, data-dependent shapes);
- random numbers from the default CUDA generator are fresh on every replay; nothing inside may
  read or set the RNG state (``PairformerStack`` draws its dropout masks outside its checkpoints
  for this reason);
- gradients are written, not accumulated: the parameters' gradients are None when it is
  captured, so each replay's backward assigns them.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from megafold.errors import ConfigError


class GraphedStep:
    """``step()`` (forward and backward, fixed shapes, CUDA) replayed from one CUDA graph.

    ``warmup`` eager runs on a side stream come first: they compile and tune the Triton kernels
    and warm the allocator, and nothing they allocate lives in the graph. The gradients of
    ``parameters`` are set to None before each warm-up run and before the capture. The captured
    outputs (``self.outputs``) are returned by every call. ``peak_bytes`` is the allocator's
    peak during the capture above what was allocated before it: the memory the graph's pool
    holds for the step's intermediates.

    Raises ConfigError when no GPU is there, and RuntimeError naming the rule a failed capture
    most likely broke.
    """

    def __init__(self, step: Callable[[], object], parameters: Iterable[torch.Tensor] = (), *, warmup: int = 1):
        if not torch.cuda.is_available():
            raise ConfigError("GraphedStep needs a CUDA device: a CPU step has no graphs to replay")
        self.step = step
        self.parameters = [p for p in parameters if p.requires_grad]
        device = torch.cuda.current_device()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # no cached casts from before the capture in the graph
        try:
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._clear_grads()
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            self._clear_grads()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph, stream=side):  # the warm-up's stream: its grad accumulators
                    self.outputs = step()
            except RuntimeError as error:
                raise RuntimeError(
                    f"GraphedStep: capturing the step failed ({error}). A captured step must not "
                    "synchronise with the host (.item(), data-dependent shapes, printing values) or "
                    "read the RNG state (checkpoints that preserve it)"
                ) from error
            self.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        finally:
            torch.set_autocast_cache_enabled(cache)

    def _clear_grads(self) -> None:
        for param in self.parameters:
            param.grad = None

    def __call__(self) -> object:
        self.graph.replay()
        return self.outputs
