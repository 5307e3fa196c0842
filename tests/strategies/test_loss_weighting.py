"""Loss-based weightings: uw, dwa, rlw, famo, db_mtl, gradnorm, stch.

LibMTL (``libmtl`` on PyPI, 1.1.5) cannot be imported without torchvision (and then fails on the
removed ``torchvision.models.utils``), and its PyPI release lacks DB-MTL, STCH and FAMO, so the
references below are plain loops written from the published code (LibMTL's ``weighting/*.py`` and
FAMO's official ``famo.py``): each builds the *same scalar loss* as that code from a leaf loss
vector and reads the effective task weights off autograd, so the comparison also checks our
closed-form weights. Everything runs in float64 over several steps with state.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gradsurg as gs
from gradsurg.errors import InvalidLossError, InvalidOptionError, InvalidStateError, MissingUpdateError
from gradsurg.strategies.base import Context, Output, Strategy
from gradsurg.strategies.db_mtl import DBMTL
from gradsurg.strategies.dwa import DWA
from gradsurg.strategies.famo import FAMO
from gradsurg.strategies.gradnorm import GradNorm
from gradsurg.strategies.rlw import RLW
from gradsurg.strategies.stch import STCH
from gradsurg.strategies.uw import UncertaintyWeighting
from tests.conftest import MultiTaskNet, make_net
from tests.hyp import seeded

TASKS, WIDTH, STEPS = 3, 7, 8
NAMES = ["uw", "dwa", "rlw", "famo", "db_mtl", "gradnorm", "stch"]


def sequence(seed: int = 0, steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    """Random (G, losses) pairs; the losses decrease noisily, like training."""
    generator = seeded(seed)
    out = []
    for t in range(steps):
        grads = torch.randn(TASKS, WIDTH, generator=generator, dtype=torch.float64)
        losses = (
            (torch.rand(TASKS, generator=generator, dtype=torch.float64) + 0.5)
            * torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)
            / (1 + 0.1 * t)
        )
        out.append((grads, losses))
    return out


def weights_of(loss_fn: Callable[[Tensor], Tensor], losses: Tensor) -> Tensor:
    """The effective task weights of a scalarised loss: ∂loss/∂Lᵢ (what backward applies to ∇Lᵢ)."""
    leaf = losses.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(leaf), leaf)
    return grad


def run_apply(
    strategy: Strategy, steps: list[tuple[Tensor, Tensor]], params: dict[str, Tensor] | None = None
) -> list[Output]:
    """Thread the state through ``apply`` by hand, as the Surgeon does."""
    state = strategy.init_state(TASKS, device=torch.device("cpu"))
    outputs = []
    for grads, losses in steps:
        out = strategy.apply(grads, Context(losses=losses, state=state, params=params or {}))
        outputs.append(out)
        state = out.state
    return outputs


def close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=rtol * float(expected.abs().max()))


# ------------------------------------------------------------------------------ cross-checks
def test_uw_matches_libmtl_regression_form_over_sgd_steps() -> None:
    """LibMTL UW: loss = Σ L/(2eˢ) + s/2, s₀ = −0.5; weights, ∂/∂s and the s trajectory (tol 1e-12)."""
    steps, lr = sequence(), 0.3
    reference = torch.full((TASKS,), -0.5, dtype=torch.float64, requires_grad=True)
    ours = nn.Parameter(UncertaintyWeighting(form="regression", init=-0.5).init_params(TASKS)["log_variance"].double())
    strategy = UncertaintyWeighting(form="regression", init=-0.5)
    for grads, losses in steps:
        s_now = reference.detach().clone()
        w_ref = weights_of(lambda L, s=s_now: (L / (2 * s.exp()) + s / 2).sum(), losses)
        (reference / 2 + losses / (2 * reference.exp())).sum().backward()
        out = strategy.apply(grads, Context(losses=losses, params={"log_variance": ours}))
        assert out.objective is not None
        (grad,) = torch.autograd.grad(out.objective, ours)
        close(out.direction, w_ref @ grads, 1e-12)
        close(grad, reference.grad, 1e-12)
        with torch.no_grad():
            reference -= lr * reference.grad
            ours -= lr * grad
        reference.grad = None
    close(ours.detach(), reference.detach(), 1e-12)


def test_uw_plain_form_is_twice_the_regression_form() -> None:
    grads, losses = sequence()[0]
    s = {"log_variance": torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)}
    plain = UncertaintyWeighting().apply(grads, Context(losses=losses, params=s)).direction
    half = UncertaintyWeighting(form="regression").apply(grads, Context(losses=losses, params=s)).direction
    close(plain, 2 * half, 1e-14)
    close(plain, torch.exp(-s["log_variance"]) @ grads, 1e-14)


@pytest.mark.parametrize("window", [1, 3])
def test_dwa_matches_libmtl_epoch_loop(window: int) -> None:
    """LibMTL DWA with epochs of ``window`` steps: T·softmax((L̄(e−1)/L̄(e−2))/temp), ones for e < 2."""
    steps, temperature = sequence(steps=4 * window + 2), 2.0
    outputs = run_apply(DWA(temperature=temperature, window=window), steps)
    buffer: dict[int, list[Tensor]] = {}
    for t, ((grads, losses), out) in enumerate(zip(steps, outputs)):
        epoch = t // window
        if epoch > 1:
            prev, prev2 = (torch.stack(buffer[e]).mean(dim=0) for e in (epoch - 1, epoch - 2))
            batch_weight = TASKS * torch.softmax((prev / prev2) / temperature, dim=-1)
        else:
            batch_weight = torch.ones(TASKS, dtype=torch.float64)
        w = weights_of(lambda L, bw=batch_weight: (L * bw).sum(), losses)
        close(out.direction, w @ grads, 1e-12)
        buffer.setdefault(epoch, []).append(losses)
    assert any(not torch.allclose(o.direction, g.sum(0)) for o, (g, _) in zip(outputs, steps))


def test_rlw_normal_is_softmax_of_the_generator_draws() -> None:
    grads, _ = sequence()[0]
    for seed in range(5):
        expected = torch.softmax(torch.randn(TASKS, generator=seeded(seed), dtype=torch.float64), dim=-1) @ grads
        close(RLW()(grads, generator=seeded(seed)), expected, 1e-12)
    uniform = torch.softmax(torch.rand(TASKS, generator=seeded(7), dtype=torch.float64), dim=-1) @ grads
    close(RLW(distribution="uniform")(grads, generator=seeded(7)), uniform, 1e-12)


def test_rlw_dirichlet_and_bernoulli_draws() -> None:
    dirichlet, bernoulli = RLW(distribution="dirichlet"), RLW(distribution="bernoulli")
    draws = torch.stack([dirichlet.sample(4, seeded(s)) for s in range(200)])
    # w = softmax(λ̃) with λ̃ on the simplex: log w recovers λ̃ up to a constant.
    simplex = draws.log() - draws.log().mean(dim=1, keepdim=True) + 0.25
    assert bool((simplex >= -1e-12).all()) and torch.allclose(simplex.sum(dim=1), torch.ones(200, dtype=torch.float64))
    assert abs(float(simplex.mean()) - 0.25) < 0.01
    picks = torch.stack([bernoulli.sample(3, seeded(s)) for s in range(200)])
    assert set(picks.unique().tolist()) == {0.0, 1.0} and bool((picks.sum(dim=1) > 0).all())
    assert len({tuple(p.tolist()) for p in picks}) == 7  # every non-empty subset of 3 tasks appears


def test_rlw_surgeon_shares_one_draw_across_groups() -> None:
    """Every group of a step sees a generator in the same state: one weight vector per step."""
    net = double_net()
    groups = gs.groups.per_module(net.trunk)
    surgeon = gs.Surgeon(groups, "rlw", seed=3)
    losses = net.losses()
    per_task = [
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, group.params, retain_graph=True)])
            for loss in losses
        ]
        for group in groups
    ]
    surgeon.backward(losses)
    recovered = []
    for group, rows in zip(groups, per_task):
        direction = torch.cat([p.grad.reshape(-1) for p in group.params])
        basis = torch.stack(rows).T
        recovered.append(torch.linalg.lstsq(basis, direction.unsqueeze(1)).solution.squeeze(1))
    assert len(recovered) == 2
    close(recovered[1], recovered[0], 1e-8)
    assert math.isclose(float(recovered[0].sum()), 1.0, rel_tol=1e-8)
    assert not torch.allclose(recovered[0], torch.full((TASKS,), 1 / TASKS, dtype=torch.float64))


class OfficialFAMO:
    """The official ``famo.py`` loop (min losses 0), in float64."""

    def __init__(self, lr: float, gamma: float) -> None:
        self.w = torch.zeros(TASKS, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)

    def weighted_loss(self, losses: Tensor) -> Tensor:
        z = torch.softmax(self.w, -1)
        big_d = losses + 1e-8
        c = (z / big_d).sum().detach()
        return (big_d.log() * z / c).sum()

    def update(self, prev: Tensor, curr: Tensor) -> None:
        delta = (prev + 1e-8).log() - (curr + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()


@pytest.mark.parametrize(("lr", "gamma"), [(0.025, 1e-3), (0.3, 0.01)])
def test_famo_matches_the_official_loop(lr: float, gamma: float) -> None:
    steps = sequence(steps=10)
    official, strategy = OfficialFAMO(lr, gamma), FAMO(lr=lr, gamma=gamma)
    state = strategy.init_state(TASKS, device=torch.device("cpu"))
    for (grads, losses), (_, after) in itertools.pairwise(steps):
        w = weights_of(official.weighted_loss, losses)
        out = strategy.apply(grads, Context(losses=losses, state=state))
        close(out.direction, w @ grads, 1e-12)
        state = strategy.after_step(out.state, losses, after)
        official.update(losses, after)
        close(state["logits"], official.w.detach(), 1e-10)
    assert float(state["logits"].abs().max()) > 1e-3  # the logits moved


@pytest.mark.parametrize(("beta", "sigma"), [(0.9, 0.0), (0.5, 0.7)])
def test_db_mtl_matches_libmtl_loop(beta: float, sigma: float) -> None:
    steps = sequence()
    outputs = run_apply(DBMTL(beta=beta, beta_sigma=sigma), steps)
    buffer = torch.zeros(TASKS, WIDTH, dtype=torch.float64)
    for t, ((grads, losses), out) in enumerate(zip(steps, outputs), start=1):
        batch_grads = weights_of(lambda L: torch.log(L + 1e-8).sum(), losses).unsqueeze(1) * grads
        buffer = batch_grads + (beta / t**sigma) * (buffer - batch_grads)
        u = buffer.norm(dim=-1)
        alpha = u.max() / (u + 1e-8)
        close(out.direction, sum(alpha[i] * buffer[i] for i in range(TASKS)), 1e-7)
        assert out.state["buffer"].shape == (TASKS, WIDTH)


def test_gradnorm_matches_libmtl_loop_over_sgd_steps() -> None:
    """LibMTL GradNorm (with L(0) = first step's losses): weights, ∂L_grad/∂p and p after SGD (tol 1e-10)."""
    steps, alpha, lr = sequence(), 1.5, 0.1
    strategy = GradNorm(alpha=alpha)
    reference = torch.ones(TASKS, dtype=torch.float64, requires_grad=True)
    ours = nn.Parameter(strategy.init_params(TASKS)["logits"].double())
    state = strategy.init_state(TASKS, device=torch.device("cpu"))
    initial = steps[0][1]
    for grads, losses in steps:
        loss_scale = TASKS * torch.softmax(reference, dim=-1)
        g_per_loss = torch.norm(loss_scale.unsqueeze(1) * grads, p=2, dim=-1)
        big_g = g_per_loss.mean(0)
        l_i = losses / initial
        r_i = l_i / l_i.mean()
        constant_term = (big_g * (r_i**alpha)).detach()
        (g_per_loss - constant_term).abs().sum(0).backward()
        out = strategy.apply(grads, Context(losses=losses, state=state, params={"logits": ours}))
        state = out.state
        assert out.objective is not None
        (grad,) = torch.autograd.grad(out.objective, ours)
        close(out.direction, loss_scale.detach() @ grads, 1e-12)
        close(grad, reference.grad, 1e-10)
        with torch.no_grad():
            reference -= lr * reference.grad
            ours -= lr * grad
        reference.grad = None
    close(ours.detach(), reference.detach(), 1e-10)
    assert float((ours.detach() - 1).abs().max()) > 1e-3


def test_gradnorm_uses_the_gram_diagonal_when_given() -> None:
    grads, losses = sequence()[0]
    params = {"logits": torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)}
    plain = GradNorm().apply(grads, Context(losses=losses, params=params))
    with_gram = GradNorm().apply(grads, Context(losses=losses, params=params, gram=grads @ grads.T))
    assert plain.objective is not None and with_gram.objective is not None
    close(with_gram.objective, plain.objective, 1e-12)


@pytest.mark.parametrize(("mu", "warmup_epochs", "epoch_steps"), [(1.0, 1, 2), (0.3, 0, 3)])
def test_stch_matches_libmtl_loop(mu: float, warmup_epochs: int, epoch_steps: int) -> None:
    steps = sequence(steps=(warmup_epochs + 3) * epoch_steps)
    strategy = STCH(mu=mu, warmup_steps=warmup_epochs * epoch_steps, nadir_steps=epoch_steps)
    outputs = run_apply(strategy, steps)
    total, count, nadir = torch.zeros(TASKS, dtype=torch.float64), 0, None
    for t, ((grads, losses), out) in enumerate(zip(steps, outputs)):
        epoch = t // epoch_steps
        if epoch <= warmup_epochs:
            w = weights_of(lambda L: torch.log(L + 1e-20).sum(), losses)
            if epoch == warmup_epochs:
                total, count = total + losses, count + 1
        else:
            nadir = total / count if nadir is None else nadir

            def stch_loss(big_l: Tensor, n: Tensor = nadir) -> Tensor:
                logs = torch.log(big_l / n + 1e-20)
                return mu * torch.log(torch.sum(torch.exp((logs - logs.max().detach()) / mu))) * TASKS

            w = weights_of(stch_loss, losses)
        close(out.direction, w @ grads, 1e-12)
    assert nadir is not None


# ------------------------------------------------------------------------------ Surgeon flows
OPTIONS: dict[str, dict[str, Any]] = {"dwa": {"window": 2}, "stch": {"warmup_steps": 1, "nadir_steps": 2}}


def double_net(seed: int = 0) -> MultiTaskNet:
    net = make_net(seed=seed)
    net.trunk.double()
    net.heads.double()
    net.inputs, net.targets = net.inputs.double(), net.targets.double()
    return net


def make_run(name: str, net: MultiTaskNet) -> tuple[gs.Surgeon, torch.optim.Optimizer]:
    strategy = gs.get_strategy(name, **OPTIONS.get(name, {}))
    params = [*net.trunk.parameters(), *net.heads.parameters()]
    surgeon = gs.Surgeon(gs.groups.per_module(net.trunk), strategy, seed=1, tasks=TASKS)
    optimizer = torch.optim.SGD([*params, *surgeon.parameters()], lr=0.05, momentum=0.5)
    return surgeon, optimizer


def train_step(name: str, net: MultiTaskNet, surgeon: gs.Surgeon, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    optimizer.zero_grad()
    surgeon.backward(net.losses())
    grads = [p.grad.clone() for p in net.trunk.parameters() if p.grad is not None]
    optimizer.step()
    if name == "famo":
        with torch.no_grad():
            surgeon.update(net.losses())
    return grads


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_mid_run_continues_identically(name: str) -> None:
    net = double_net()
    surgeon, optimizer = make_run(name, net)
    for _ in range(3):
        train_step(name, net, surgeon, optimizer)
    saved = copy.deepcopy((surgeon.state_dict(), optimizer.state_dict(), net))
    expected = [train_step(name, net, surgeon, optimizer) for _ in range(4)]

    state, optimizer_state, clone = saved
    resumed, resumed_optimizer = make_run(name, clone)
    resumed.load_state_dict(state)
    resumed_optimizer.load_state_dict(optimizer_state)
    for want in expected:
        got = train_step(name, clone, resumed, resumed_optimizer)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("name", ["dwa", "famo", "db_mtl", "gradnorm", "stch"])
def test_state_changes_the_direction(name: str) -> None:
    """After a few steps the stateful methods no longer give their first-step direction."""
    net = double_net()
    surgeon, optimizer = make_run(name, net)
    first = train_step(name, net, surgeon, optimizer)
    for _ in range(4):
        train_step(name, net, surgeon, optimizer)
    fresh, _ = make_run(name, net)
    fresh_optimizer = torch.optim.SGD(net.trunk.parameters(), lr=0.0)
    now = train_step(name, net, surgeon, optimizer)
    restart = train_step(name, net, fresh, fresh_optimizer)
    assert first and not all(torch.allclose(a, b) for a, b in zip(now, restart))


def test_famo_update_flow_and_missing_update() -> None:
    net = double_net()
    surgeon, optimizer = make_run("famo", net)
    with pytest.raises(MissingUpdateError, match=r"surgeon\.update"):
        surgeon.update(net.losses())
    optimizer.zero_grad()
    surgeon.backward(net.losses())
    optimizer.step()
    with pytest.raises(MissingUpdateError, match=r"surgeon\.update\(losses_after_step\)"):
        surgeon.backward(net.losses())
    before = surgeon.state_dict()["state"]["0"]["logits"].clone()
    with torch.no_grad():
        surgeon.update(net.losses())
    after = surgeon.state_dict()["state"]["0"]["logits"]
    assert not torch.equal(before, after)
    optimizer.zero_grad()
    surgeon.backward(net.losses())  # no error once updated


def test_uw_parameters_move_toward_log_loss() -> None:
    """∂/∂sᵢ = 1 − exp(−sᵢ)Lᵢ: one SGD step moves every sᵢ toward log Lᵢ."""
    net = double_net()
    surgeon, optimizer = make_run("uw", net)
    (s,) = list(surgeon.parameters())
    losses = torch.stack([loss.detach() for loss in net.losses()]).float()
    before = s.detach().clone()
    optimizer.zero_grad()
    surgeon.backward(net.losses())
    assert s.grad is not None
    torch.testing.assert_close(s.grad, 1 - torch.exp(-before) * losses)
    optimizer.step()
    assert bool(((s.detach() - before).sign() == (losses.log() - before).sign()).all())


def test_gradnorm_parameters_reduce_the_objective() -> None:
    net = double_net()
    strategy = GradNorm()
    surgeon = gs.Surgeon(gs.groups.whole(net.trunk), strategy, seed=0, tasks=TASKS)
    (p,) = list(surgeon.parameters())
    optimizer = torch.optim.SGD(surgeon.parameters(), lr=0.01)
    for _ in range(3):  # move past step 0, where r = 1
        optimizer.zero_grad()
        surgeon.backward(net.losses())
        optimizer.step()
    trunk = list(net.trunk.parameters())
    grads = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trunk, retain_graph=True)])
            for loss in net.losses()
        ]
    )
    losses = torch.stack([loss.detach() for loss in net.losses()])
    state = surgeon.state_dict()["state"]["all"]

    def objective() -> float:
        out = strategy.apply(grads, Context(losses=losses, state=state, params={"logits": p.detach().double()}))
        assert out.objective is not None
        return float(out.objective)

    start = objective()
    optimizer.zero_grad()
    surgeon.backward(net.losses())
    optimizer.step()
    assert objective() < start
    assert math.isclose(float((TASKS * torch.softmax(p.detach(), 0)).sum()), TASKS, rel_tol=1e-6)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("uw", {"form": "half"}),
        ("uw", {"init": math.inf}),
        ("dwa", {"temperature": 0}),
        ("dwa", {"window": 0}),
        ("dwa", {"window": 1.5}),
        ("rlw", {"distribution": "gamma"}),
        ("famo", {"lr": 0}),
        ("famo", {"gamma": -1e-3}),
        ("db_mtl", {"beta": 1.0}),
        ("db_mtl", {"beta_sigma": -1}),
        ("gradnorm", {"alpha": -0.5}),
        ("gradnorm", {"alpha": True}),
        ("stch", {"mu": 0.0}),
        ("stch", {"warmup_steps": -1}),
        ("stch", {"nadir_steps": 0}),
    ],
)
def test_options_out_of_range(name: str, options: dict[str, Any]) -> None:
    key = next(iter(options))
    with pytest.raises(InvalidOptionError, match=rf"Option `{key}` of \w+ must be .*; found {key}="):
        gs.get_strategy(name, **options)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "rlw"])
def test_missing_losses_name_the_argument(name: str) -> None:
    grads, _ = sequence()[0]
    strategy = gs.get_strategy(name)
    with pytest.raises(InvalidLossError, match=r"losses=Tensor\[T\]"):
        strategy(grads)
    with pytest.raises(InvalidLossError, match=r"needs the task losses"):
        strategy.apply(grads, Context(state=strategy.init_state(TASKS, device=grads.device)))
    with pytest.raises(InvalidLossError, match=r"shape \(3,\)"):
        strategy(grads, losses=torch.ones(2))


@pytest.mark.parametrize("name", ["famo", "db_mtl", "stch"])
def test_logarithmic_methods_refuse_negative_losses(name: str) -> None:
    grads, _ = sequence()[0]
    with pytest.raises(InvalidLossError, match=r"must be ≥ 0"):
        gs.get_strategy(name)(grads, losses=torch.tensor([1.0, -0.5, 2.0]))
    if name == "famo":
        famo = FAMO()
        with pytest.raises(InvalidLossError, match=r"surgeon\.update"):
            famo.after_step(famo.init_state(TASKS, device=grads.device), torch.ones(3), -torch.ones(3))


def test_learnable_parameter_missing_and_db_mtl_shape_change() -> None:
    grads, losses = sequence()[0]
    with pytest.raises(InvalidStateError, match=r"'log_variance'"):
        UncertaintyWeighting().apply(grads, Context(losses=losses))
    first = DBMTL().apply(grads, Context(losses=losses, state={"steps": 0}))
    with pytest.raises(InvalidStateError, match=r"same shape"):
        DBMTL().apply(grads[:, :4], Context(losses=losses, state=first.state))


def test_surgeon_needs_tasks_for_learnable_weights() -> None:
    net = make_net()
    with pytest.raises(InvalidOptionError, match="tasks"):
        gs.Surgeon(gs.groups.whole(net.trunk), "uw")


@pytest.mark.parametrize("name", NAMES)
def test_direct_call_dtype_device_and_weights_output(name: str) -> None:
    grads = torch.randn(TASKS, WIDTH, generator=seeded(0))
    losses = torch.tensor([0.5, 1.0, 2.0])
    out = gs.get_strategy(name)(grads, losses=losses, generator=seeded(1))
    assert out.shape == (WIDTH,) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    strategy = gs.get_strategy(name)
    params = strategy.init_params(TASKS)
    result = strategy.apply(
        grads,
        Context(
            losses=losses, generator=seeded(1), state=strategy.init_state(TASKS, device=grads.device), params=params
        ),
    )
    if result.weights is not None:
        close(result.direction, result.weights.to(grads.dtype) @ grads, 1e-6)
    else:
        assert name == "db_mtl"
