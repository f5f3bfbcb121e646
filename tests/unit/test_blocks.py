"""Divide and conquer over blocks of z: one optimizer per block, taking turns (BBTv2)."""

from __future__ import annotations

import numpy as np
import pytest

from blackbox.optim import make_optimizer
from blackbox.optim.blocks import DivideAndConquer
from tests.unit.test_optim import CENTER, DIM, F0, run, sphere

BLOCKS = [4, 3, 3]


def divide_and_conquer(inner="cma", blocks=BLOCKS, turn_generations=1, seed=0, **options):
    return DivideAndConquer("divide-and-conquer", sum(blocks), 8, seed,
                            options={"blocks": blocks, "inner": inner, "turn_generations": turn_generations,
                                     **options})


def changed_blocks(asks: list[np.ndarray], incumbent_before: list[np.ndarray]) -> list[set[int]]:
    """Per generation, the blocks in which some candidate differs from the incumbent."""
    starts = np.cumsum([0] + BLOCKS)
    out = []
    for ask, incumbent in zip(asks, incumbent_before):
        differs = np.any(ask != incumbent, axis=0)
        out.append({b for b in range(len(BLOCKS)) if differs[starts[b]:starts[b + 1]].any()})
    return out


@pytest.mark.parametrize("turn_generations", [1, 3])
def test_each_generation_moves_one_block_and_the_blocks_take_turns(turn_generations):
    opt = divide_and_conquer(turn_generations=turn_generations)
    asks, incumbents = [], []
    for _ in range(4 * len(BLOCKS) * turn_generations):
        incumbents.append(opt.incumbent.copy())
        z = opt.ask()
        asks.append(z)
        opt.tell(z, sphere(z))
    expected = [{(g // turn_generations) % len(BLOCKS)} for g in range(len(asks))]
    assert changed_blocks(asks, incumbents) == expected


def test_incumbent_is_the_lowest_loss_seen_and_never_worsens():
    opt = divide_and_conquer()
    seen, losses = [], []
    for _ in range(30):
        z = opt.ask()
        f = sphere(z)
        opt.tell(z, f)
        seen.append(z)
        losses.append(f)
        all_z, all_f = np.concatenate(seen), np.concatenate(losses)
        assert opt.incumbent_loss == all_f.min()
        np.testing.assert_array_equal(opt.incumbent, all_z[np.argmin(all_f)])
    assert opt.best[1] == opt.incumbent_loss


@pytest.mark.parametrize("inner", ["cma", "sep-cma", "ng:OnePlusOne"])
def test_reduces_the_shifted_sphere(inner):
    # The sphere is separable: coordinate blocks in turns must get close to the joint optimum.
    opt = divide_and_conquer(inner=inner)
    run(opt, 90)
    assert opt.best[1] < 1e-2 * F0
    joint = make_optimizer(inner, dim=DIM, popsize=8, seed=0)
    run(joint, 1)
    assert opt.best[1] < joint.best[1]  # and it did not stand still


def test_resume_is_bit_exact():
    first = divide_and_conquer(inner="cma", turn_generations=2)
    run(first, 5)
    state = first.state_dict()
    rest = run(first, 7)
    again = divide_and_conquer(inner="cma", turn_generations=2)
    again.load_state_dict(state)
    for expected, z in zip(rest, run(again, 7)):
        np.testing.assert_array_equal(expected, z)


def test_budget_planning_inner_optimizers_get_their_options():
    opt = divide_and_conquer(inner="ng:NGOpt", inner_options={"budget": 40})
    run(opt, 6)
    assert all(inner.options["budget"] == 40 for inner in opt.inner)


@pytest.mark.parametrize("options, match", [
    ({"blocks": [4, 3]}, "sum to 7, not to dim 10"),
    ({"blocks": [4, 0, 6]}, "block sizes >= 1"),
    ({"blocks": None}, "block sizes >= 1"),
    ({"inner": "gradient"}, "uses gradients"),
    ({"inner": "nope"}, "unknown optimizer 'nope'"),
    ({"turn_generations": 0}, "turn_generations"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        DivideAndConquer("divide-and-conquer", DIM, 8, 0, options={"blocks": BLOCKS, **options})


def test_center_is_reached_blockwise():
    # Every block's optimizer did its own part: each block of the incumbent is near CENTER's.
    opt = divide_and_conquer()
    run(opt, 90)
    starts = np.cumsum([0] + BLOCKS)
    for b in range(len(BLOCKS)):
        block = slice(starts[b], starts[b + 1])
        assert np.abs(opt.incumbent[block] - CENTER[block]).max() < 0.1
