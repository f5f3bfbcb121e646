"""Derivative-free optimizers over the low-dimensional search vector z.

    opt = make_optimizer("cma", dim=500, popsize=20, seed=0, sigma0=1.0)
    while not opt.stop():
        z = opt.ask()                 # (popsize, dim) float64
        opt.tell(z, losses_of(z))     # one batched backbone call per generation
    z_best, loss_best = opt.best

Names: "cma", "sep-cma", "cma-polish" (CMA-ES, then a local polish: BBT-RGB), "mezo" and "ng:<NAME>" for any nevergrad optimizer, plus the
white-box "gradient" (needs a server that allows gradients: ``tell(z, losses, grads)``);
see ``available_optimizers()``. pycma and nevergrad are imported only when used.
"""

from . import cma_es, gradient, mezo, nevergrad_opt, two_stage  # noqa: F401  (importing registers them)
from .base import BaseOptimizer, Optimizer, available_optimizers, make_optimizer, optimizer_class, register_optimizer
from .isolation import GlobalRNGSandbox, pinned_blas
from .cma_es import CMAES, SepCMAES
from .gradient import GradientDescent
from .mezo import MeZO
from .nevergrad_opt import NevergradOptimizer
from .two_stage import CMAThenPolish

__all__ = [
    "BaseOptimizer",
    "CMAES",
    "CMAThenPolish",
    "GlobalRNGSandbox",
    "GradientDescent",
    "MeZO",
    "NevergradOptimizer",
    "Optimizer",
    "SepCMAES",
    "available_optimizers",
    "make_optimizer",
    "optimizer_class",
    "pinned_blas",
    "register_optimizer",
]
