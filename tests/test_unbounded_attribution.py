"""Which params `jaxem.stationarity.stationarity` names as unbounded.

A free-df Student-t component collapsing onto 12 tied points (tests/models.py
`tied_student_t_data`): the likelihood has no maximum along its scale (each halving
adds 12 log 2), and the warning must name the param to bound, ``sigma``. Two end
states of real fits, where the preconditioned direction p along which Q rises is not
carried by ``sigma`` alone: the collapsed location one ulp off the ties (a gradient of
-1.9e15, all of p), and the location on the ties with df at 1.7e-10 (log-df and
log-scale both exactly linear, p shared between them). Each param is checked here
against the log-likelihood itself: along ``sigma`` it rises without end, along
``df`` it levels off, along ``mu`` it is highest on the tie.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from models import student_t_mixture, tied_student_t_data

import jaxem
from jaxem.estep import e_step
from jaxem.inspection import model_structure
from jaxem.stationarity import stationarity

# Fits of tests/test_convergence.py's collapse (seed 487) that ended in these states:
# on branch h16j under the test suite's XLA flags, and under XLA's defaults.
END_STATES = {
    "location-one-ulp-off-the-ties": {
        "w": [0.24999994983726329, 0.7500000501627366],
        "mu": [None, 0.9863405441640787],  # None: one ulp from the tie, towards 0
        "sigma": [1.5153558009629904e-11, 0.798888813023373],
        "df": [1.5135702400492772e-09, 30.30895201734239],
    },
    "log-df-and-log-scale-both-linear": {
        "w": [0.24999997682483432, 0.7500000231751656],
        "mu": [0.0, 0.7549190202234249],  # 0.0: on the tie
        "sigma": [1.460612246513575e-12, 0.7638390178361636],
        "df": [1.6812447269476834e-10, 34.61401551179462],
    },
}


def _params(case, tie):
    state = {k: list(v) for k, v in END_STATES[case].items()}
    state["mu"][0] = float(np.nextafter(tie, 0.0)) if state["mu"][0] is None else tie
    return {k: jnp.asarray(v) for k, v in state.items()}


@pytest.mark.parametrize("case", list(END_STATES))
def test_the_unbounded_verdict_names_the_collapsing_scale(x64, case):
    x = jnp.asarray(tied_student_t_data())
    params = _params(case, float(x[0]))
    structure = model_structure(student_t_mixture, (x, 2), {})
    nesting = structure.max_plate_nesting
    marginals = e_step(student_t_mixture, params, (x, 2), {}, nesting).marginals
    names = list(params)
    _, gain, unbounded, _ = stationarity(
        student_t_mixture, params, marginals, names, structure.constraints, (x, 2), {}, nesting
    )
    assert float(gain) > 1.0
    assert {n: bool(v) for n, v in unbounded.items()} == {
        "w": False,
        "mu": False,
        "sigma": True,
        "df": False,
    }

    # The log-likelihood along each of the collapsed component's params.
    def log_likelihood(name, value, base=params):
        moved = {**base, name: base[name].at[0].set(value)}
        return float(jaxem.log_likelihood(student_t_mixture, moved, x, 2))

    start = log_likelihood("sigma", float(params["sigma"][0]))
    # df: the log-likelihood levels off (the normal limit), 119 and 132 nats up at 1e3;
    # mu: its maximum is on the tie, at most 0.05 above the start.
    assert abs(log_likelihood("df", 1e10) - log_likelihood("df", 1e3)) < 0.01
    grid = float(x[0]) + np.linspace(-1e-9, 1e-9, 101)
    best = max(log_likelihood("mu", float(v)) for v in grid)
    assert best == log_likelihood("mu", float(x[0])) and best - start < 0.1
    # sigma, the location on the tie (one ulp off, the rise ends once sigma is 1e3 times
    # smaller: both must move, and only a bound on sigma stops it): 12 log 2 more with
    # every halving, at 1e-3 and 1e-12 times it alike.
    on_tie = {**params, "mu": params["mu"].at[0].set(float(x[0]))}
    sigma = float(params["sigma"][0])
    for shrink in (1e-3, 1e-12):
        rise = log_likelihood("sigma", sigma * shrink / 2, on_tie) - log_likelihood(
            "sigma", sigma * shrink, on_tie
        )
        np.testing.assert_allclose(rise, 12 * np.log(2.0), rtol=1e-3)
