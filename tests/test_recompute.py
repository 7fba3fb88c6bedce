"""recompute.py: the mixer's Delta (always) and u (DiS's recompute_scan_inputs) recomputed in
the backward pass. The reference is the same model with autograd keeping every tensor."""
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

import memory
import model as dis
from recompute import Recomputed

pytestmark = pytest.mark.usefixtures("one_thread")


def gradients(model, autocast=False, checkpointed=False):
    """Parameter gradients of one training loss of `model` on a fixed batch (dropouts seeded)."""
    torch.manual_seed(1)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    model.zero_grad(set_to_none=True)
    run = (lambda *a: checkpoint(model, *a, use_reentrant=False)) if checkpointed else model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = run(x, t, y)
    out.float().pow(2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def recomputing(model, on):
    for module in model.modules():
        if isinstance(module, dis.BiMamba):
            module.recompute_scan_inputs = on
    return model


def keeping_everything(monkeypatch):
    """The mixers' Recomputed blocks disabled: autograd keeps u and Delta."""
    monkeypatch.setattr(dis, "Recomputed", lambda: Recomputed(enabled=False))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return dis.DiS(img_size=8, patch_size=2, channels=3, embed_dim=32, depth=2, num_classes=10, drop_path_rate=0.1,
                   scan_backend="ref", recompute_scan_inputs=True).train()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["", "grad-checkpointing"])
@pytest.mark.parametrize("u_too", [True, False], ids=["u-and-delta", "delta"])
def test_gradients_equal_keeping_everything(model, autocast, checkpointed, u_too, monkeypatch):
    """The same gradients, bit for bit: the recomputed u and Delta are the forward pass's (also
    under autocast, whose state the recomputation restores; inside gradient checkpointing the
    block leaves checkpointing in charge)."""
    ours = gradients(recomputing(model, u_too), autocast, checkpointed)
    keeping_everything(monkeypatch)
    reference = gradients(model, autocast, checkpointed)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_dropped_outputs_are_freed_and_recomputed_once():
    """Autograd keeps no dropped output, nor a view of one, whether saved while the function runs
    (exp saves its output) or after it (the product saves a[1:]); the backward pass recomputes
    them with one more call and gives the gradient of the plain computation."""
    calls = []

    def fn(x):
        calls.append(1)
        a = x.exp()
        return a, (a * 2).sin()  # sin saves its input a * 2: kept

    def loss(a, b):
        return (a[1:] * b[1:]).sum()

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with Recomputed() as saved:
        a, b = saved.compute(fn, x, drop=(0,))
        out = loss(a, b)
    a_storage = StorageWeakRef(a.untyped_storage())
    del a, b
    assert a_storage.expired() and len(calls) == 1
    out.backward()
    assert len(calls) == 2
    x_ref = x.detach().requires_grad_()
    loss(*fn(x_ref)).backward()
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "disabled"])
def test_off_keeps_what_autograd_keeps(grad):
    """Without autograd (sampling), or disabled, the function runs once and saved tensors are
    kept as autograd keeps them."""
    x = torch.ones(3, requires_grad=True)
    with torch.set_grad_enabled(grad), Recomputed(enabled=False if grad else True) as saved:
        u, = saved.compute(lambda v: (v.exp(),), x, drop=(0,))
    assert torch.equal(u, torch.full((3,), 1.0).exp())
    if grad:
        u_storage = StorageWeakRef(u.untyped_storage())
        out = u.sum()
        del u
        assert not u_storage.expired()  # exp's backward keeps its output
        out.backward()


@pytest.mark.gpu
def test_gradients_equal_on_the_gpu_kernels(monkeypatch):
    """On CUDA with the fast scan and convolution kernels, under bf16 autocast as train.py runs."""
    torch.manual_seed(0)
    model = dis.DiS(img_size=16, patch_size=2, channels=3, embed_dim=64, depth=2, num_classes=10,
                    recompute_scan_inputs=True).cuda().train()

    def grads():
        torch.manual_seed(1)
        x, t, y = torch.randn(4, 3, 16, 16, device="cuda"), torch.tensor([1, 5, 500, 999]).cuda(), torch.arange(4).cuda()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]
    ours = grads()
    keeping_everything(monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(ours, grads()))


def test_freed_with_the_graph_without_the_garbage_collector():
    """Once the backward pass has run, nothing keeps the recipe's inputs: the hooks hold no
    reference cycle, which the garbage collector would break only at its next run (on a GPU,
    training steps' worth of activations later)."""
    gc.disable()
    try:
        h = torch.randn(5, requires_grad=True) * 1
        with Recomputed() as saved:
            a, = saved.compute(lambda v: (v.exp(),), h, drop=(0,))
            out = a.sum()
        h_storage = StorageWeakRef(h.untyped_storage())
        del h, a, saved  # as a forward pass's locals at its return
        assert not h_storage.expired()  # the recipe's input, until the backward pass
        out.backward()
        del out
        assert h_storage.expired()
    finally:
        gc.enable()


def test_no_hooks_under_torch_compile():
    """Traced by torch.compile, a Recomputed block installs no hooks (the compiler's partitioner
    chooses what to recompute), so the mixer traces without a graph break; values and gradients
    are those of the plain computation."""
    def loss(x):
        with Recomputed() as saved:
            a, = saved.compute(lambda v: (v.exp(),), x, drop=(0,))
            return (a * 2).sum()
    torch._dynamo.reset()
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.compile(loss, backend="eager", fullgraph=True)(x).backward()
    assert torch.equal(x.grad, 2 * x.detach().exp())


def test_leaves_gradient_checkpointing_in_charge():
    """Inside gradient checkpointing, whose saved-tensor hooks ours would shadow (hooks do not
    compose: the innermost take the saves), a Recomputed block installs none: nothing created
    inside stays referenced after the forward pass, and the gradient is the plain one."""
    def fn(x):
        with Recomputed() as saved:
            a, = saved.compute(lambda v: (v.exp(),), x, drop=(0,))
            return (a.sin() * a).sum()  # the product saves a.sin(), made inside
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    with memory._Created() as created:
        out = checkpoint(fn, x, use_reentrant=False)
    assert created.alive(but=[out]) == 0
    out.backward()
    a = x.detach().exp()
    assert torch.allclose(x.grad, (a.cos() * a + a.sin()) * a)
