"""A training step's forward and backward passes, and a sampler's model calls, replayed as CUDA graphs.

A DiS-S/2 step is some 2,400 kernels, most of them small. Launched one by one from Python they
cost the host more time than the GPU needs to run them, and the GPU waits (BENCHMARKS.md,
"Training": synchronised against graphed steps). Captured once into a CUDA graph, the whole
forward and backward pass is one launch. The optimizer, the EMA and the checks stay outside the
graph, as in an eager step. A sampler calls the model once or twice per step at one batch size:
GraphedSampling captures each kind of call once (sample.py's default on a GPU).

What the capture requires of the step: every shape fixed (the batch, --scan-save-every settled),
no copy from the host and no wait for the GPU inside it (diffusion.keep_schedule_on), random
numbers from the default generator only (dropout and drop path; the graph draws new ones at each
replay), one process (no DDP all-reduce inside the graph). train.py uses it by default on one GPU; its
replayed steps give the eager steps' losses and weights bit for bit (tests/test_train.py).
"""
import torch


def warm_up(fn, inputs, device):
    """fn(*inputs) once on a side stream, as a capture runs, ordered after and before the current
    stream's work: what fn builds on first use is then built outside the capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)


class GraphedPasses:
    """passes(*inputs) -> loss, a forward and backward pass that leaves the gradients in the
    parameters' .grad, captured as a CUDA graph on copies of `inputs`.

    Calling it copies new inputs (same shapes) into the graph's buffers, replays the graph and
    returns the loss tensor, which the next call overwrites. The gradients are the graph's own
    buffers, rewritten by every replay: the parameters' .grad must not be set to None or replaced
    while the graph is in use (no optimizer.zero_grad(set_to_none=True))."""

    def __init__(self, passes, params, inputs):
        self.inputs = [x.detach().clone() for x in inputs]
        device = self.inputs[0].device
        # One pass outside the capture first, on a side stream as the capture will run: whatever is
        # built on first use (cuBLAS workspaces, compiled kernels) must not be built inside it. Its
        # random numbers are drawn again by the graph's first replay, so the run's stay as eager.
        rng = torch.cuda.get_rng_state(device)
        warm_up(passes, self.inputs, device)
        torch.cuda.set_rng_state(rng, device)
        for p in params:  # the backward pass in the capture allocates them in the graph's memory
            p.grad = None
        torch.cuda.empty_cache()  # the warm-up's activations: the graph's pool takes their place
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = passes(*self.inputs)

    def __call__(self, *inputs):
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.loss


class GraphedCalls:
    """fn(*inputs) -> output, a no-grad function of tensors replayed from CUDA graphs: one graph per
    shapes and dtypes of the inputs, captured at its first call. For a function called many times
    on inputs of one shape, as a sampler calls the model at each of its steps.

    Each call copies the inputs into the graph's buffers, replays it and returns a copy of its
    output. Whatever fn reads besides its inputs (the weights) is read where it lies at each
    replay; an autocast around the calls must not cache its casts (cache_enabled=False), since the
    cache is freed when its context ends and a graph would go on reading it."""

    def __init__(self, fn):
        self.fn, self.graphs = fn, {}

    def __call__(self, *inputs):
        key = tuple((x.shape, x.dtype, x.device) for x in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        buffers, graph, output = self.graphs[key]
        for buffer, x in zip(buffers, inputs):
            buffer.copy_(x)
        graph.replay()
        return output.clone()

    def _capture(self, inputs):
        buffers = [x.clone() for x in inputs]
        warm_up(self.fn, buffers, buffers[0].device)  # one call first, outside the capture (see GraphedPasses)
        graph = torch.cuda.CUDAGraph()  # a memory pool of its own: graphs of one sampler interleave
        with torch.cuda.graph(graph):
            output = self.fn(*buffers)
        return buffers, graph, output


class GraphedSampling:
    """An eval-mode DiS as a sampler calls it (diffusion.generate): model(x, t[, y]) and
    model.forward_with_cfg(x, t, y, cfg_scale, cfg_channels), each replayed from CUDA graphs
    (GraphedCalls). The samples are the eager model's, bit for bit (tests/test_sample.py)."""

    def __init__(self, model):
        self.model, self.num_classes = model, model.num_classes
        self.forward, self.guided = GraphedCalls(model), {}

    def __call__(self, x, t, y=None):
        return self.forward(x, t) if y is None else self.forward(x, t, y)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=None):
        key = (cfg_scale, cfg_channels)
        if key not in self.guided:
            self.guided[key] = GraphedCalls(lambda x, t, y: self.model.forward_with_cfg(x, t, y, *key))
        return self.guided[key](x, t, y)
