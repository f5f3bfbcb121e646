"""Unit tests for blackbox.optim: convergence, registry, validation, determinism, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blackbox.optim import base as optim_base
from blackbox.optim import (
    BaseOptimizer,
    Optimizer,
    available_optimizers,
    make_optimizer,
    register_optimizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DIM = 10
CENTER = np.random.RandomState(1234).uniform(-1.0, 1.0, DIM)  # f(0) = 3.27


def sphere(z: np.ndarray) -> np.ndarray:
    return np.sum((np.atleast_2d(z) - CENTER) ** 2, axis=1)


F0 = float(sphere(np.zeros(DIM))[0])

# Every family member the tests exercise; NGOpt needs a budget to pick its algorithm.
CONFIGS = {
    "cma": {},
    "sep-cma": {},
    "ng:TwoPointsDE": {},
    "ng:OnePlusOne": {},
    "ng:NGOpt": {"budget": 400},
    "mezo": {},
    "cma-polish": {"budget": 40, "polish_share": 0.5},  # the polish from the third generation on
}


def run(opt: BaseOptimizer, generations: int, objective=sphere) -> list[np.ndarray]:
    asks = []
    for _ in range(generations):
        z = opt.ask()
        asks.append(z)
        opt.tell(z, objective(z))
    return asks


# ----------------------------------------------------------------------------- convergence

# (name, popsize, generations, options, required reduction of the best loss vs. f(0)).
# Thresholds sit about 10x above what seeds 0..2 reach, so a real regression trips them.
CONVERGENCE = [
    ("cma", 10, 60, {}, 1e-3),  # reaches ~3e-5
    ("sep-cma", 10, 60, {}, 1e-3),  # ~1e-5
    ("ng:OnePlusOne", 10, 60, {}, 1e-3),  # ~1e-5 .. 1e-4
    ("ng:TwoPointsDE", 20, 60, {}, 0.1),  # DE is slow on a sphere: ~5e-3 .. 3e-2
    ("ng:NGOpt", 10, 40, {"budget": 400}, 1e-2),  # picks CMA here: ~1e-3
    ("mezo", 20, 150, {"lr": 1e-2}, 1e-2),  # ~1e-3 (the default lr is for tuning losses, far flatter)
    ("mezo", 20, 60, {"lr": 0.05, "momentum": 0.5}, 1e-3),
    ("cma-polish", 10, 60, {"budget": 600}, 1e-3),
]


@pytest.mark.parametrize("name,popsize,generations,options,factor", CONVERGENCE)
def test_reduces_shifted_sphere(name, popsize, generations, options, factor):
    opt = make_optimizer(name, DIM, popsize, seed=0, sigma0=0.5, options=options)
    run(opt, generations)
    _, best_loss = opt.best
    assert best_loss < factor * F0, f"{name}: best {best_loss:.3g} vs f(0)={F0:.3g}"


def test_convergence_thresholds_are_not_trivial():
    # Random search with the same budget as cma must miss cma's threshold: the bar is real.
    rng = np.random.default_rng(0)
    z = 0.5 * rng.standard_normal((600, DIM))
    assert sphere(z).min() > 1e-3 * F0


# -------------------------------------------------------------------------------- registry


def test_available_optimizers_lists_everything():
    names = available_optimizers()
    assert {"cma", "sep-cma", "mezo", "gradient", "ng:<NAME>"} <= set(names)


def test_unknown_optimizer_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer 'cmaes'.*sep-cma.*ng:<NAME>"):
        make_optimizer("cmaes", DIM, 10, seed=0)


def test_duplicate_registration_raises(monkeypatch):
    monkeypatch.setattr(optim_base, "_REGISTRY", dict(optim_base._REGISTRY))

    class Dummy(BaseOptimizer):
        def _setup(self):
            pass

        def _ask(self):
            return np.zeros((self.popsize, self.dim))

        def _tell(self, candidates, losses):
            pass

        def _stop(self):
            return False

    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("cma")(Dummy)
    with pytest.raises(ValueError, match="shadowed by the 'ng:' family"):
        register_optimizer("ng:Mine")(Dummy)
    register_optimizer("dummy")(Dummy)
    assert isinstance(make_optimizer("dummy", 3, 2, seed=0), Dummy)
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("dummy")(Dummy)


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("cma", {"CMA_diag": True}, r"'CMA_diag'.*did you mean.*'CMA_diagonal'"),
        ("cma", {"popsize": 4}, "make_optimizer's own arguments"),
        ("sep-cma", {"CMA_diagonal": False}, "set by make_optimizer's own arguments"),
        ("mezo", {"learning_rate": 0.1}, r"'learning_rate'.*allowed options: eps, lr, lr_decay, momentum, weight_decay"),
        ("ng:OnePlusOne", {"budgte": 10}, r"'budgte'.*allowed options: bounds_method, budget"),
        ("ng:OnePlusOne", {"bounds_method": "clipping"}, "needs bounds"),
        ("cma-polish", {}, "needs the run's budget"),
        ("cma-polish", {"budget": 100, "polish_share": 1.0}, "between 0 and 1"),
    ],
)
def test_bad_options_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(name, DIM, 10, seed=0, options=options)


def test_cma_passes_pycma_options_through():
    opt = make_optimizer("cma", DIM, 10, seed=0, options={"CMA_diagonal": True, "tolfun": 1e-3})
    assert opt.es.opts["CMA_diagonal"] is True and opt.es.opts["tolfun"] == 1e-3
    assert make_optimizer("sep-cma", DIM, 10, seed=0).es.opts["CMA_diagonal"] is True


def test_unknown_nevergrad_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"unknown nevergrad optimizer 'ng:TwoPointDE'.*ng:TwoPointsDE"):
        make_optimizer("ng:TwoPointDE", DIM, 10, seed=0)
    with pytest.raises(ValueError, match=r"ng:OnePlusOne"):
        make_optimizer("ng:oneplusone", DIM, 10, seed=0)


def test_ngopt_without_budget_asks_for_one():
    with pytest.raises(ValueError, match="needs a budget"):
        make_optimizer("ng:NGOpt", DIM, 10, seed=0)


def test_thread_based_nevergrad_optimizers_are_refused():
    with pytest.raises(ValueError, match="Powell in a scipy worker thread"):
        make_optimizer("ng:Powell", DIM, 1, seed=0)


def test_nevergrad_cma_that_would_crash_is_refused():
    # d >= 300: pycma uses TPA, and nevergrad's CMA (population 4 + 3 ln d = 21 > 10) would
    # call pycma's ask twice without a tell a few generations in.
    with pytest.raises(ValueError, match=r"population of 21 > popsize 10.*Popsize >= 21 avoids it"):
        make_optimizer("ng:CMA", 300, 10, seed=0)
    make_optimizer("ng:CMA", 300, 21, seed=0)
    make_optimizer("ng:CMA", 299, 10, seed=0)  # CSA below 300: pycma tolerates the extra asks


def test_mezo_needs_even_popsize():
    with pytest.raises(ValueError, match="even popsize"):
        make_optimizer("mezo", DIM, 7, seed=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 0}, "dim must be >= 1"),
        ({"popsize": 1}, "popsize must be >= 2"),  # cma
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"sigma0": 0.0}, "sigma0 must be finite and > 0"),
        ({"bounds": (1.0, 2.0)}, "must contain 0"),
        ({"bounds": (1.0, -1.0)}, "lower < upper"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"dim": DIM, "popsize": 10, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_optimizer("cma", args.pop("dim"), args.pop("popsize"), **args)


# ------------------------------------------------------------------------ ask / tell / best


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ask_shape_dtype_and_idempotence(name):
    opt = make_optimizer(name, DIM, 6, seed=0, options=CONFIGS[name])
    assert isinstance(opt, Optimizer)
    assert opt.calls_per_candidate == 1
    z = opt.ask()
    assert z.shape == (6, DIM) and z.dtype == np.float64
    assert np.all(np.isfinite(z))
    assert not np.array_equal(z[0], z[1])
    z[:] = 123.0  # the caller's copy; must not leak into the optimizer
    assert np.array_equal(opt.ask(), opt.ask()) and not np.any(opt.ask() == 123.0)
    opt.tell(opt.ask(), sphere(opt.ask()))
    assert opt.generation == 1


@pytest.mark.filterwarnings("ignore:Bounds are .* sigma away")  # nevergrad: narrow box on purpose
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bounds_are_respected(name):
    opt = make_optimizer(name, DIM, 6, seed=0, sigma0=2.0, bounds=(-0.5, 0.25), options=CONFIGS[name])
    for z in run(opt, 5, objective=lambda z: -sphere(z)):  # pushes towards the walls
        assert z.min() >= -0.5 and z.max() <= 0.25


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tell_validation(name):
    opt = make_optimizer(name, DIM, 6, seed=0, options=CONFIGS[name])
    with pytest.raises(ValueError, match="without a pending ask"):
        opt.tell(np.zeros((6, DIM)), np.zeros(6))
    z = opt.ask()
    losses = sphere(z)
    with pytest.raises(ValueError, match="shape"):
        opt.tell(z[:5], losses[:5])
    with pytest.raises(ValueError, match="shape"):
        opt.tell(z, losses[:5])
    with pytest.raises(ValueError, match="returned by the last ask"):
        opt.tell(z[::-1], losses)
    for bad in (np.nan, np.inf, -np.inf):
        broken = losses.copy()
        broken[2] = bad
        with pytest.raises(ValueError, match=r"non-finite losses at positions \[2\]"):
            opt.tell(z, broken)
    # Rejected tells leave the optimizer as it was.
    assert opt.generation == 0 and np.array_equal(opt.ask(), z)
    opt.tell(z, losses)
    assert opt.generation == 1


def test_best_tracking():
    opt = make_optimizer("sep-cma", DIM, 4, seed=0)
    x0, loss0 = opt.best  # nothing told yet: the starting point, loss inf
    assert np.array_equal(x0, np.zeros(DIM)) and loss0 == np.inf
    z = opt.ask()
    opt.tell(z, np.array([3.0, 1.0, 2.0, 5.0]))
    x, loss = opt.best
    assert loss == 1.0 and np.array_equal(x, z[1])
    x[:] = 0.0  # a copy
    assert np.array_equal(opt.best[0], z[1])
    z2 = opt.ask()
    opt.tell(z2, np.array([4.0, 1.5, 9.0, 1.0]))  # ties keep the earlier one
    assert opt.best[1] == 1.0 and np.array_equal(opt.best[0], z[1])
    z3 = opt.ask()
    opt.tell(z3, np.array([4.0, 0.5, 9.0, 7.0]))
    assert opt.best[1] == 0.5 and np.array_equal(opt.best[0], z3[1])


def test_mezo_is_two_sided_spsa():
    lr, eps, q = 0.1, 1e-2, 3
    opt = make_optimizer("mezo", DIM, 2 * q, seed=5, options={"lr": lr, "eps": eps})
    z = opt.ask()
    assert np.allclose(z[:q], -z[q:])  # x = 0: pairs x +/- eps*u
    u = z[:q] / eps
    assert 0.5 < np.std(u) < 2.0  # N(0, 1) directions
    losses = sphere(z)
    opt.tell(z, losses)
    g = ((losses[:q] - losses[q:]) / (2 * eps)) @ u / q
    z_next = opt.ask()
    centers = (z_next[:q] + z_next[q:]) / 2
    np.testing.assert_allclose(centers, np.tile(-lr * g, (q, 1)), rtol=1e-9, atol=1e-12)
    center = centers[0]
    assert not np.allclose(z_next[:q] - center, z[:q])  # fresh directions each generation


def test_mezo_default_step_moves_a_loss_as_flat_as_a_tuning_loss():
    """On SST-2 (bundled model, a prefix at d = 100) the train loss falls by about |g|^2 per
    step of lr 1, i.e. |g| ~ 0.04 per unit of z. The old default lr 1e-2 moved z by about
    1e-3 a generation there and left the loss flat; the default must move z by units of
    the search scale in a few dozen generations, and not explode."""
    d, q = 100, 10
    gradient = np.random.default_rng(1).standard_normal(d)
    gradient *= 0.04 / np.linalg.norm(gradient)

    def travelled(options):
        opt = make_optimizer("mezo", d, 2 * q, seed=0, options=options)
        run(opt, 30, objective=lambda z: 0.74 - z @ gradient)
        return float(np.linalg.norm(opt.x))

    assert 1.0 < travelled({}) < 100.0
    assert travelled({"lr": 1e-2}) < 0.05
    # The schedule slows the steps down: lr / (1 + lr_decay * t).
    assert travelled({"lr_decay": 1.0}) < 0.5 * travelled({})


def test_mezo_stops_when_diverged():
    opt = make_optimizer("mezo", DIM, 4, seed=0, options={"lr": 1e300})
    assert not opt.stop()
    z = opt.ask()
    with np.errstate(over="ignore"):
        opt.tell(z, 1e10 * sphere(z))
        assert opt.stop()


def test_nevergrad_budget_stops():
    opt = make_optimizer("ng:OnePlusOne", DIM, 5, seed=0, options={"budget": 15})
    run(opt, 2)
    assert not opt.stop()
    run(opt, 1)
    assert opt.stop()


# ---------------------------------------------------------------------- determinism, resume


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_same_asks_other_seed_other_asks(name):
    a = run(make_optimizer(name, DIM, 6, seed=0, options=CONFIGS[name]), 3)
    b = run(make_optimizer(name, DIM, 6, seed=0, options=CONFIGS[name]), 3)
    c = run(make_optimizer(name, DIM, 6, seed=1, options=CONFIGS[name]), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))


# This one draws from the global np.random itself (nevergrad's lognormal mutation rate).
GLOBAL_RNG_USER = "ng:LognormalDiscreteOnePlusOne"


@pytest.mark.parametrize("name", [*CONFIGS, GLOBAL_RNG_USER])
def test_global_numpy_rng_is_neither_used_nor_consumed(name):
    options = CONFIGS.get(name, {})
    np.random.seed(42)
    before = np.random.get_state()[1].copy()
    a = run(make_optimizer(name, DIM, 6, seed=0, options=options), 3)
    assert np.array_equal(np.random.get_state()[1], before)
    np.random.seed(7)  # a different global state must not change the asks
    b = run(make_optimizer(name, DIM, 6, seed=0, options=options), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_cma_seed_matches_plain_pycma():
    import cma

    opt = make_optimizer("cma", DIM, 8, seed=3, sigma0=0.7)
    es = cma.CMAEvolutionStrategy(np.zeros(DIM), 0.7, {"popsize": 8, "seed": 3, "verbose": -9})
    for _ in range(3):
        z, ref = opt.ask(), np.asarray(es.ask())
        assert np.array_equal(z, ref)
        opt.tell(z, sphere(z))
        es.tell(list(ref), sphere(ref).tolist())
    # ...and our seed 0 is deterministic, where pycma's seed 0 would mean "use the clock".
    assert np.array_equal(
        make_optimizer("cma", DIM, 8, seed=0).ask(), make_optimizer("cma", DIM, 8, seed=0).ask()
    )


RESUME = [
    ("cma", DIM, None, {}),
    ("cma", DIM, (-1.0, 1.0), {}),
    ("sep-cma", DIM, None, {}),
    ("sep-cma", 300, None, {}),  # d >= 300: pycma switches to TPA step-size adaptation
    ("ng:TwoPointsDE", DIM, None, {}),
    ("ng:OnePlusOne", DIM, None, {}),
    ("ng:NGOpt", DIM, (-2.0, 2.0), {"budget": 400}),
    (GLOBAL_RNG_USER, DIM, None, {}),
    ("mezo", DIM, None, {}),
    ("mezo", DIM, None, {"momentum": 0.9, "weight_decay": 0.01}),
    ("cma-polish", DIM, (-1.0, 1.0), {"budget": 40, "polish_share": 0.5}),
]


@pytest.mark.parametrize("pending", [False, True], ids=["after-tell", "mid-generation"])
@pytest.mark.parametrize("name,dim,bounds,options", RESUME)
def test_resume_is_bit_exact(name, dim, bounds, options, pending):
    k, m = 4, 5
    center = np.linspace(-1.0, 1.0, dim)

    def objective(z):
        return np.sum((z - center) ** 2, axis=1)

    def make():
        return make_optimizer(name, dim, 6, seed=11, sigma0=0.8, bounds=bounds, options=options)

    uninterrupted = run(make(), k + m, objective)

    first = make()
    run(first, k, objective)
    if pending:
        first.ask()
    state = first.state_dict()
    assert isinstance(state, bytes)
    del first
    resumed = make()
    run(resumed, 2, objective)  # its own progress must be overwritten entirely
    resumed.load_state_dict(state)
    assert resumed.generation == k
    continued = run(resumed, m, objective)
    for gen, (x, y) in enumerate(zip(uninterrupted[k:], continued), start=k):
        assert np.array_equal(x, y), f"{name}: generation {gen} differs after resume"


def test_load_state_rejects_other_arguments():
    state = make_optimizer("mezo", DIM, 6, seed=0).state_dict()
    with pytest.raises(ValueError, match="different arguments.*seed"):
        make_optimizer("mezo", DIM, 6, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="different arguments.*options"):
        make_optimizer("mezo", DIM, 6, seed=0, options={"lr": 0.5}).load_state_dict(state)
    with pytest.raises(ValueError, match="saved by"):
        make_optimizer("sep-cma", DIM, 6, seed=0).load_state_dict(state)


# ------------------------------------------------------------------------------- plumbing


def test_blas_is_pinned_during_ask_and_tell(monkeypatch):
    from threadpoolctl import threadpool_info

    monkeypatch.setattr(optim_base, "_REGISTRY", dict(optim_base._REGISTRY))
    seen = []

    @register_optimizer("probe")
    class Probe(BaseOptimizer):
        def _setup(self):
            pass

        def _ask(self):
            seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
            return np.zeros((self.popsize, self.dim))

        def _tell(self, candidates, losses):
            seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])

        def _stop(self):
            return False

    opt = make_optimizer("probe", 3, 2, seed=0)
    opt.tell(opt.ask(), np.zeros(2))
    assert len(seen) == 2 and all(counts and set(counts) == {1} for counts in seen)


def test_package_does_not_import_torch_or_eagerly_load_backends():
    code = (
        "import sys; import blackbox.optim as o; "
        "assert 'torch' not in sys.modules; "
        "assert 'cma' not in sys.modules and 'nevergrad' not in sys.modules; "
        "o.make_optimizer('ng:OnePlusOne', 3, 2, seed=0).ask(); o.make_optimizer('cma', 3, 2, seed=0); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)


# ------------------------------------------------------------------- white-box gradient


def sphere_gradient(z: np.ndarray) -> np.ndarray:
    return 2.0 * (np.atleast_2d(z) - CENTER)


def run_with_gradients(opt: BaseOptimizer, steps: int) -> list[np.ndarray]:
    asks = []
    for _ in range(steps):
        z = opt.ask()
        asks.append(z)
        opt.tell(z, sphere(z), sphere_gradient(z))
    return asks


@pytest.mark.parametrize("options,steps,factor", [
    ({}, 100, 1e-3),  # Adam, lr 0.1 * sigma0
    ({"method": "sgd", "lr": 0.1}, 30, 1e-3),
    ({"method": "sgd", "lr": 0.05, "momentum": 0.5, "weight_decay": 1e-4}, 40, 1e-3),
])
def test_gradient_descent_reduces_shifted_sphere(options, steps, factor):
    opt = make_optimizer("gradient", DIM, 20, seed=0, sigma0=0.5, options=options)
    run_with_gradients(opt, steps)
    assert opt.best[1] < factor * F0


def test_gradient_descent_takes_one_point_per_step_and_needs_gradients():
    opt = make_optimizer("gradient", DIM, 20, seed=0)
    assert opt.uses_gradients and opt.popsize == 1 and isinstance(opt, Optimizer)
    z = opt.ask()
    assert z.shape == (1, DIM) and not z.any()  # starts at z = 0
    with pytest.raises(ValueError, match="needs the gradients"):
        opt.tell(z, sphere(z))
    with pytest.raises(ValueError, match="shape"):
        opt.tell(z, sphere(z), np.zeros((1, DIM + 1)))
    with pytest.raises(ValueError, match="non-finite gradients"):
        opt.tell(z, sphere(z), np.full((1, DIM), np.nan))
    assert opt.generation == 0
    opt.tell(z, sphere(z), sphere_gradient(z))
    # Adam's first step moves every coordinate by lr against the gradient's sign.
    np.testing.assert_allclose(opt.ask()[0], 0.1 * np.sign(CENTER))
    gradient_free = make_optimizer("cma", DIM, 4, seed=0)
    z = gradient_free.ask()
    with pytest.raises(ValueError, match="gradient-free"):
        gradient_free.tell(z, sphere(z), sphere_gradient(z))


def test_gradient_descent_respects_bounds_and_resumes_bit_exactly():
    def make():
        return make_optimizer("gradient", DIM, 1, seed=3, bounds=(-0.2, 0.2), options={"lr": 0.5})

    uninterrupted = run_with_gradients(make(), 9)
    assert all(z.min() >= -0.2 and z.max() <= 0.2 for z in uninterrupted)
    first = make()
    run_with_gradients(first, 4)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted[4:], run_with_gradients(resumed, 5)))


@pytest.mark.parametrize("options,match", [
    ({"method": "lbfgs"}, "'method' must be one of adam, sgd"),
    ({"lr": -1.0}, "'lr' must be finite and > 0"),
    ({"betas": (0.9, 1.0)}, "'betas'"),
    ({"momentum": 1.0}, "'momentum'"),
    ({"learning_rate": 0.1}, "unknown option"),
])
def test_gradient_descent_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer("gradient", DIM, 1, seed=0, options=options)


# ------------------------------------------------------------------------------ cma-polish

def test_cma_polish_hands_cma_es_best_point_to_a_local_search_that_only_improves():
    popsize, budget = 10, 400
    opt = make_optimizer("cma-polish", DIM, popsize, seed=0, sigma0=0.5, options={"budget": budget})
    plain = make_optimizer("cma", DIM, popsize, seed=0, sigma0=0.5)
    search = opt.search_generations
    assert search == 28  # 40 generations, 30% of them polish
    for _ in range(search):  # the first stage is plain CMA-ES, ask for ask
        z = opt.ask()
        np.testing.assert_array_equal(z, plain.ask())
        opt.tell(z, sphere(z))
        plain.tell(z, sphere(z))
    handed, handed_loss = plain.best
    losses = []
    for _ in range(budget // popsize - search):
        z = opt.ask()
        if not losses:  # every first polish step is a small step around CMA-ES's best
            assert np.abs(z - handed).max() < 5 * 0.3 * plain.es.sigma
        opt.tell(z, sphere(z))
        losses.append(opt.incumbent_loss)
    assert losses == sorted(losses, reverse=True) and losses[-1] < handed_loss
