"""PyTorch as an independent oracle: same network, same numbers, to ~1e-10 (float64).

PyTorch is a test-only dependency. Without it this module is skipped with a printed
reason on a developer machine, and fails under CI (CI=true), where it must run.
"""


import numpy as np
import pytest

from klayer.nn.network import Network

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the machine
    torch = None


pytestmark = pytest.mark.usefixtures("require_torch")


def torch_cost(net: Network, X, y, lam, mode="train"):
    """The klayer model written independently with torch ops; returns (cost, loss, scores, params)."""
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
          for k, v in net.params.items()}
    h = torch.tensor(X, dtype=torch.float64)
    for l in range(1, net.num_layers):
        s = F.linear(h, tp[f"W{l}"], tp[f"b{l}"])
        if net.has_batch_norm(l):
            if mode == "train":  # training=True normalises with the biased batch variance
                s = F.batch_norm(s, None, None, tp[f"gamma{l}"], tp[f"beta{l}"], training=True,
                                 eps=net.bn_eps)
            else:
                s = F.batch_norm(s, torch.tensor(net.buffers[f"running_mean{l}"]),
                                 torch.tensor(net.buffers[f"running_var{l}"]),
                                 tp[f"gamma{l}"], tp[f"beta{l}"], training=False, eps=net.bn_eps)
        h = F.relu(s)
    k = net.num_layers
    scores = F.linear(h, tp[f"W{k}"], tp[f"b{k}"])
    loss = F.cross_entropy(scores, torch.tensor(y))
    cost = loss + lam * sum((tp[f"W{l}"] ** 2).sum() for l in range(1, k + 1))
    return cost, loss, scores, tp


def _close(ours, theirs, rtol=1e-10):
    """Agreement to rtol relative to the tensor's largest entry."""
    theirs = np.asarray(theirs)
    scale = max(np.abs(theirs).max(), 1e-30)
    return np.abs(np.asarray(ours) - theirs).max() / scale <= rtol


@pytest.mark.parametrize("batch_norm,hidden", [
    (False, [30, 20]), (True, [50, 50]), (True, [50, 30, 20, 20, 10, 10, 10, 10]), (True, []),
])
def test_gradients_agree_with_pytorch_autograd(batch_norm, hidden):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 40)), rng.integers(0, 10, 20)
    net = Network(40, hidden, batch_norm=batch_norm, seed=3)
    for k, v in net.params.items():  # non-trivial γ and β
        if k.startswith(("gamma", "beta")):
            v += rng.normal(0, 0.3, v.shape)
    ours = net.loss(X, y, lam=0.01)
    cost, loss, _, tp = torch_cost(net, X, y, 0.01)
    cost.backward()
    assert ours.cost == pytest.approx(cost.item(), rel=1e-13)
    assert ours.loss == pytest.approx(loss.item(), rel=1e-13)
    for name, g in ours.grads.items():
        theirs = tp[name].grad.numpy()
        if name[0] == "b" and name[1:].isdigit() and net.has_batch_norm(int(name[1:])):
            # true gradient 0: both are roundoff, compare absolutely
            assert np.abs(g - theirs).max() <= 1e-12, name
        else:
            assert _close(g, theirs), (name, np.abs(g - theirs).max(), np.abs(theirs).max())


def test_eval_mode_agrees_with_pytorch():
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((30, 40)), rng.integers(0, 10, 30)
    net = Network(40, [25, 15], seed=4)
    for i in range(3):
        net.update_running_stats(net.loss(X[i * 10:(i + 1) * 10], y[i * 10:(i + 1) * 10]).batch_stats)
    _, loss, scores, _ = torch_cost(net, X, y, 0.0, mode="eval")
    assert _close(net.scores(X), scores.detach().numpy())
    assert net.evaluate(X, y)["loss"] == pytest.approx(loss.item(), rel=1e-12)
