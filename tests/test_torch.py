"""resolvent.torch: the autograd function (gradcheck for every method) and the ChainAttention module."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import resolvent  # noqa: E402
import resolvent.torch as rt  # noqa: E402

METHODS = [
    ("dense", {}),
    ("exact", {}),
    ("blockwise", {"block_size": 3}),
    ("blockwise", {"block_size": 4}),
    ("blockwise", {"block_size": 16}),
    ("blockwise", {"block_size": 3, "topk": 1}),
    ("blockwise", {"block_size": 2, "topk": 2}),
]
IDS = ["dense", "exact", "blockwise-b3", "blockwise-b4", "blockwise-b16", "topk1-b3", "topk2-b2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(seed=0, batch=(2,), n=10, d=3, dv=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch + (n, d), generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(batch + (n, d), generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(batch + (n, dv), generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("method,opts", METHODS, ids=IDS)
def test_gradcheck(method, opts):
    q, k, v = tensors()
    gamma = torch.tensor([0.35, 0.8], dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, g: rt.chain_attention(q, k, v, g, method=method, **opts)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, gamma))


def test_gradcheck_per_head_gamma_broadcast_over_batch():
    q, k, v = tensors(batch=(2, 3), n=7)
    gamma = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)  # one per head
    fn = lambda q, k, v, g: rt.chain_attention(q, k, v, g, block_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, gamma))


def test_float_gamma_and_values_match_numpy():
    q, k, v = tensors()
    y = rt.chain_attention(q, k, v, 0.6, block_size=4)
    assert y.requires_grad and y.dtype == torch.float64
    ref = resolvent.chain_attention(*(t.detach().numpy() for t in (q, k, v)), 0.6, block_size=4)
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    y.sum().backward()  # an expanded (zero-stride) cotangent
    dq, dk, dv = resolvent.chain_attention_vjp(*(t.detach().numpy() for t in (q, k, v)), 0.6, np.ones(ref.shape),
                                               block_size=4)
    np.testing.assert_array_equal(q.grad.numpy(), dq)
    np.testing.assert_array_equal(v.grad.numpy(), dv)


def test_autograd_matches_plain_torch_dense_chain():
    """Autograd through the peers' plain-PyTorch dense chain attention gives the same gradients."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "peers.py"
    spec = importlib.util.spec_from_file_location("peers", path)
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    q, k, v = tensors(n=12)
    dy = torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda: rt.chain_attention(q, k, v, 0.7, method="exact"),
               lambda: peers.torch_dense_chain(q, k, v, 0.7)):
        for t in (q, k, v):
            t.grad = None
        (fn() * dy).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_gradients_keep_dtype(dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in tensors(dtype=torch.float32))
    gamma = torch.tensor([0.5, 0.7], requires_grad=True)  # float32 gamma with half q, k, v
    y = rt.chain_attention(q, k, v, gamma, block_size=4)
    y.float().square().sum().backward()
    for t in (q, k, v):
        assert t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all()
    assert gamma.grad.dtype == torch.float32


@pytest.mark.parametrize("name", ["q", "k", "v", "dy"])
def test_non_finite_input_raises_naming_the_argument(name):
    q, k, v = tensors()
    bad = dict(q=q, k=k, v=v, dy=torch.ones(2, 10, 2, dtype=torch.float64))
    with torch.no_grad():
        bad[name] = bad[name].clone()
        bad[name][1, 4, 0] = float("nan") if name in "qv" else float("inf")
    msg = f"{name} must contain only finite values"
    if name != "dy":
        with pytest.raises(ValueError, match=msg):
            rt.chain_attention(bad["q"], bad["k"], bad["v"], 0.5)
    else:
        y = rt.chain_attention(q, k, v, 0.5)
        with pytest.raises(ValueError, match=msg):
            y.backward(bad["dy"])


@pytest.mark.parametrize("method,opts", METHODS, ids=IDS)
def test_check_finite_false_same_values_and_gradients(method, opts):
    results = []
    for check in (True, False):
        q, k, v = tensors(seed=3)
        gamma = torch.tensor([0.35, 0.8], dtype=torch.float64, requires_grad=True)
        y = rt.chain_attention(q, k, v, gamma, method=method, check_finite=check, **opts)
        y.backward(torch.cos(y.detach()))
        results.append([y.detach()] + [t.grad for t in (q, k, v, gamma)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_check_finite_false_lets_nan_through():
    q, k, v = tensors()
    with torch.no_grad():
        v[1, 4, 0] = float("nan")
    y = rt.chain_attention(q, k, v, 0.5, check_finite=False)
    assert torch.isnan(y[1]).any() and torch.isfinite(y[0]).all()
    y.sum().backward()  # no ValueError in the backward either
    layer = rt.ChainAttention(4, 2, block_size=4, check_finite=False)
    x = torch.randn(1, 6, 4)
    x[0, 2, 1] = float("nan")
    assert torch.isnan(layer(x)).any()
    with pytest.raises(ValueError, match="q must contain only finite values"):
        rt.ChainAttention(4, 2, block_size=4)(x)


def test_chain_attention_module_shapes_and_gamma():
    torch.manual_seed(0)
    layer = rt.ChainAttention(12, 3, gamma=[0.1, 0.5, 0.9], block_size=4)
    torch.testing.assert_close(layer.gamma, torch.tensor([0.1, 0.5, 0.9]))
    x = torch.randn(2, 10, 12)
    y = layer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert layer.gamma_logit.grad is not None and layer.q_proj.weight.grad is not None
    fixed = rt.ChainAttention(12, 3, gamma=0.0, learnable_gamma=False, method="dense")
    assert "gamma_logit" not in dict(fixed.named_parameters())
    assert torch.equal(fixed.gamma, torch.zeros(3))


def test_module_is_causal_and_matches_manual_heads():
    torch.manual_seed(1)
    layer = rt.ChainAttention(8, 2, gamma=0.7, method="exact").double()
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 5:] += 1.0  # the future must not change the past
    torch.testing.assert_close(layer(x2)[:, :5], y[:, :5], rtol=1e-12, atol=1e-12)
    q, k, v = (p(x).view(3, 9, 2, 4).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    heads = rt.chain_attention(q, k, v, layer.gamma, method="exact")
    ref = layer.out_proj(heads.transpose(1, 2).reshape(3, 9, 8))
    torch.testing.assert_close(y, ref)
    layer_seq = rt.ChainAttention(8, 2, gamma=0.7, method="exact", batch_first=False).double()
    layer_seq.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer_seq(x.transpose(0, 1)), y.transpose(0, 1))


def test_learnable_gamma_stays_in_range():
    layer = rt.ChainAttention(4, 2, gamma=0.5)
    with torch.no_grad():
        layer.gamma_logit.copy_(torch.tensor([100.0, -100.0]))
    g = layer.gamma
    assert bool((g >= 0).all() and (g < 1).all())
    layer(torch.randn(1, 6, 4))  # still a valid gamma for the forward


def test_module_errors():
    with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)"):
        rt.ChainAttention(10, 3)
    with pytest.raises(ValueError, match=r"gamma must be one value or one per head \(2\), got 3"):
        rt.ChainAttention(4, 2, gamma=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, 0.999\)"):
        rt.ChainAttention(4, 2, gamma=0.0)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\)"):
        rt.ChainAttention(4, 2, gamma=1.0, learnable_gamma=False)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, n, embed_dim\) with embed_dim = 4"):
        rt.ChainAttention(4, 2)(torch.randn(2, 5, 3))


def test_training_reduces_the_loss():
    """A few Adam steps on a causal task (predict the running mean of the inputs) reduce the loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), rt.ChainAttention(16, 2, gamma=0.5, block_size=4),
                                torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 4, generator=g)
    target = x.cumsum(1) / torch.arange(1, 17)[:, None]
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model[1].gamma_logit.grad is not None and torch.isfinite(model[1].gamma_logit.grad).all()


def test_docstring_examples():
    import doctest

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(rt, "resolvent.torch"):
        runner.run(test)
    assert runner.tries >= 6 and runner.failures == 0
