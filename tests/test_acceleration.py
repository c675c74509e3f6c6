"""Accelerated EM (SQUAREM, Anderson): the same optimum as plain EM, never lower, safeguard
exercised.

Plain EM and SQUAREM run to convergence in float64 over the zoo of tests/test_monotone.py
(Anderson over its models shared in tests/models.py); the final values are checked against
the scipy log-likelihood of the zoo, and the iterations on which the safeguards fire are
replayed by hand with plain EM steps.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import normal_mixture
from numpyro.distributions import constraints
from test_monotone import ZOO, assert_monotone, reference_log_likelihood

import jaxem
from jaxem import EM
from jaxem.acceleration import anderson_step, init_anderson, squarem_extrapolate


def _case(name):
    model, make_case = ZOO[name]
    x, K, init, component_logpdf = make_case(np.random.default_rng(sorted(ZOO).index(name) + 17))
    x = jnp.asarray(x)
    return model, x, K, {k: jnp.asarray(v) for k, v in init.items()}, component_logpdf


def _assert_reaches_the_plain_em_optimum(name, acceleration):
    """Accelerated EM ends at plain EM's optimum (the scipy log-likelihood at its
    params), never lower, with a monotone history."""
    model, x, K, init, component_logpdf = _case(name)
    key = jax.random.PRNGKey(0)
    kw = dict(max_iter=3000, tol=1e-13, init_params=init)
    plain = EM(model).run(key, x, K, **kw)
    fast = EM(model, acceleration=acceleration).run(key, x, K, **kw)
    assert bool(plain.converged) and bool(fast.converged)
    assert not bool(fast.diverged)
    ll_plain, ll_fast = float(plain.log_likelihood), float(fast.log_likelihood)
    # Never lower than plain EM (to rounding), and the same optimum.
    assert ll_fast >= ll_plain - 1e-11 * abs(ll_plain), (ll_fast, ll_plain)
    np.testing.assert_allclose(ll_fast, ll_plain, rtol=1e-9)
    np.testing.assert_allclose(
        ll_fast, reference_log_likelihood(component_logpdf, fast.params), rtol=1e-10
    )
    for pname in plain.params:
        np.testing.assert_allclose(
            np.asarray(fast.params[pname]), np.asarray(plain.params[pname]), atol=2e-4
        )
    history = np.asarray(fast.history)[: int(fast.num_iters)]
    assert_monotone(np.append(history, ll_fast), 1e-12)
    # The start is poor, so the fit moved a long way.
    assert ll_fast - history[0] > 5.0


@pytest.mark.parametrize("name", list(ZOO))
def test_squarem_reaches_the_plain_em_optimum(name, x64):
    _assert_reaches_the_plain_em_optimum(name, "squarem")


def test_squarem_cuts_em_steps_on_an_overlapping_mixture(x64):
    """Each SQUAREM cycle costs three EM steps; on this slow mixture it still needs less
    than half the EM steps plain EM needs to get within 1e-9 of the optimum."""
    model, x, K, init, _ = _case("normal")
    plain = EM(model).run(jax.random.PRNGKey(0), x, K, max_iter=800, tol=0.0, init_params=init)
    fast = EM(model, acceleration="squarem").run(
        jax.random.PRNGKey(0), x, K, max_iter=60, tol=0.0, init_params=init
    )
    best = max(float(plain.log_likelihood), float(fast.log_likelihood))

    def steps_to_reach(history):
        return int(np.argmax(np.asarray(history) >= best - 1e-9 * abs(best)))

    plain_steps, fast_steps = steps_to_reach(plain.history), 3 * steps_to_reach(fast.history)
    assert 0 < 2 * fast_steps < plain_steps, (fast_steps, plain_steps)


def test_safeguard_falls_back_to_plain_em(x64):
    """On the full-covariance mixture an early cycle's extrapolation overshoots: the
    safeguard must reject it and keep exactly the point of two plain EM steps."""
    model, x, K, init, _ = _case("mvn")
    fast, plain = EM(model, acceleration="squarem"), EM(model)
    state = fast.init(jax.random.PRNGKey(0), x, K, init_params=init)
    for _ in range(40):
        before = state
        state, log_lik = fast.update(state, x, K)
        if int(state.acceleration.num_rejected) > int(before.acceleration.num_rejected):
            break
    else:
        pytest.fail("the safeguard never fired in 40 cycles")
    # Replay the cycle with plain EM: two steps, then the SQUAREM point by hand.
    first, ll0 = plain.update(before._replace(acceleration=()), x, K)
    second, _ = plain.update(first, x, K)
    np.testing.assert_allclose(float(log_lik), float(ll0), rtol=1e-14)
    for pname, value in second.params.items():
        np.testing.assert_allclose(np.asarray(state.params[pname]), np.asarray(value), rtol=1e-12)
    constraints_ = {
        "w": constraints.simplex,
        "mu": constraints.real,
        "L": constraints.lower_cholesky,
    }
    extrapolated, alpha = squarem_extrapolate(
        before.params, first.params, second.params, constraints_, before.acceleration.step_max
    )
    assert float(alpha) > 1.0
    assert float(jaxem.log_likelihood(model, extrapolated, x, K)) < float(ll0)
    # alpha_max shrinks after a rejected step at alpha_max, and stays otherwise.
    step_max, before_max = float(state.acceleration.step_max), float(before.acceleration.step_max)
    if float(alpha) >= before_max:
        assert step_max < before_max
    else:
        assert step_max == before_max


def _squarem_point(p0, p1, p2, step_max):
    """Varadhan and Roland's S3 point, in numpy: log w, mu, log sigma coordinates, the step
    length measured on w itself."""
    chart = {"w": np.log, "mu": lambda v: v, "sigma": np.log}
    u = [{n: chart[n](np.asarray(p[n])) for n in chart} for p in (p0, p1, p2)]
    r = {n: u[1][n] - u[0][n] for n in chart}
    v = {n: u[2][n] - 2 * u[1][n] + u[0][n] for n in chart}
    w0, w1, w2 = (np.asarray(p["w"]) for p in (p0, p1, p2))
    metric = [{**r, "w": w1 - w0}, {**v, "w": w2 - 2 * w1 + w0}]
    norm = [np.sqrt(sum(np.sum(x**2) for x in m.values())) for m in metric]
    alpha = float(np.clip(norm[0] / norm[1], 1.0, step_max))
    u_new = {n: u[0][n] + 2 * alpha * r[n] + alpha**2 * v[n] for n in chart}
    w = np.exp(u_new["w"] - np.max(u_new["w"]))
    return {"w": w / w.sum(), "mu": u_new["mu"], "sigma": np.exp(u_new["sigma"])}, alpha


def test_squarem_cycles_follow_the_s3_scheme(x64):
    """Replay the first SQUAREM cycles on the univariate mixture with plain EM steps and the
    S3 extrapolation written out in numpy: an accepted cycle ends at one EM step from the
    extrapolated point, a rejected one at the second plain EM point; alpha_max doubles after
    an accepted step at alpha_max. Both kinds of cycle occur."""
    model, x, K, init, _ = _case("normal")
    fast, plain = EM(model, acceleration="squarem"), EM(model)
    state = fast.init(jax.random.PRNGKey(0), x, K, init_params=init)
    outcomes = []
    for _ in range(8):
        before = state
        state, _ = fast.update(state, x, K)
        p0 = before.params
        first, ll0 = plain.update(before._replace(acceleration=()), x, K)
        second, _ = plain.update(first, x, K)
        step_max = float(before.acceleration.step_max)
        point, alpha = _squarem_point(p0, first.params, second.params, step_max)
        point = {n: jnp.asarray(v) for n, v in point.items()}
        accepted = float(jaxem.log_likelihood(model, point, x, K)) >= float(ll0)
        if accepted:
            expected, _ = plain.update(before._replace(params=point, acceleration=()), x, K)
            expected = expected.params
        else:
            expected = second.params
        for name, value in expected.items():
            np.testing.assert_allclose(
                np.asarray(state.params[name]), np.asarray(value), rtol=1e-8, atol=1e-10
            )
        if alpha >= step_max:
            step_max = 2 * step_max if accepted else max(step_max / 2, 1.0)
        assert float(state.acceleration.step_max) == step_max
        outcomes.append((accepted, alpha > 1.0))
    assert (True, True) in outcomes and any(not a for a, _ in outcomes), outcomes


# a, b take gradient steps; w and sigma closed form.
GRID_BY_GRADIENT = {"a": "gradient", "b": "gradient"}


def shifted_means(x, K):
    """Means on a grid mu_k = a + b k: affine in (a, b), a weighted least-squares closed
    form (jaxem.affine) unless m_step names them (GRID_BY_GRADIENT)."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    a = numpyro.param("a", jnp.array(-0.5))
    b = numpyro.param("b", jnp.array(0.5))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    mu = a + b * jnp.arange(K)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


@pytest.mark.parametrize(
    "model, m_step",
    [(normal_mixture, "gradient"), (shifted_means, GRID_BY_GRADIENT)],
    ids=["gradient", "mixed"],
)
def test_squarem_with_gradient_m_steps(model, m_step, x64):
    """Gradient-path parameters: the accelerated fit reaches the optimum of plain EM (with
    closed-form updates where the model allows them)."""
    rng = np.random.default_rng(5)
    z = rng.integers(0, 3, 300)
    x = jnp.asarray(rng.normal(np.array([-4.0, 0.0, 4.0])[z], 1.0))
    init = {"mu": jnp.array([-1.0, 0.0, 1.0])} if model is normal_mixture else None
    reference = EM(model).run(
        jax.random.PRNGKey(0), x, 3, max_iter=1000, tol=1e-13, init_params=init
    )
    fast = EM(model, m_step=m_step, m_step_iters=5, acceleration="squarem").run(
        jax.random.PRNGKey(0), x, 3, max_iter=100, tol=1e-12, init_params=init
    )
    assert bool(reference.converged) and bool(fast.converged) and not bool(fast.diverged)
    ll_ref, ll_fast = float(reference.log_likelihood), float(fast.log_likelihood)
    assert ll_fast >= ll_ref - 1e-9 * abs(ll_ref)
    np.testing.assert_allclose(ll_fast, ll_ref, rtol=1e-9)
    assert_monotone(np.asarray(fast.history)[: int(fast.num_iters)], 1e-12)
    paths = EM(model, m_step=m_step).m_step_paths(x, 3)
    assert paths["w"].startswith("gradient" if m_step == "gradient" else "closed-form")
    if model is shifted_means:
        assert paths["a"].startswith("gradient") and paths["b"].startswith("gradient")
        np.testing.assert_allclose(float(fast.params["b"]), float(reference.params["b"]), rtol=1e-4)


def test_squarem_restarts_under_vmap(x32):
    """Restarts under vmap equal one-at-a-time accelerated fits, in float32."""
    model, x, K, _, _ = _case("normal")
    x = x.astype(jnp.float32)
    em = EM(model, acceleration="squarem")
    init = {"mu": jnp.array([-1.0, 0.0, 1.0], jnp.float32)}
    key = jax.random.PRNGKey(1)
    result = em.run(key, x, K, max_iter=30, tol=0.0, num_restarts=2, init_params=init)
    single = em.run(key, x, K, max_iter=30, tol=0.0, init_params=init)
    np.testing.assert_allclose(
        np.asarray(result.restart_log_likelihoods), float(single.log_likelihood), rtol=1e-5
    )
    assert_monotone(np.asarray(result.history), 1e-5)


def test_bad_acceleration_name():
    with pytest.raises(
        ValueError, match="acceleration must be None, 'squarem' or 'anderson', got 'nesterov'"
    ):
        EM(normal_mixture, acceleration="nesterov")


@pytest.mark.parametrize("acceleration, max_iter", [("squarem", 50), ("anderson", 100)])
def test_accelerated_hard_em(acceleration, max_iter, x64):
    """Hard EM: the accelerated classification likelihood never decreases, and the fit ends
    at a fixed point of plain hard EM."""
    model, x, K, init, _ = _case("normal")
    fast = EM(model, hard=True, acceleration=acceleration)
    result = fast.run(jax.random.PRNGKey(0), x, K, max_iter=max_iter, tol=1e-12, init_params=init)
    assert bool(result.converged) and not bool(result.diverged)
    history = np.asarray(result.history)[: int(result.num_iters)]
    assert_monotone(history, 1e-12)
    assert history[-1] - history[0] > 5.0
    plain = EM(model, hard=True)
    state = plain.init(jax.random.PRNGKey(0), x, K, init_params=result.params)
    state, _ = plain.update(state, x, K)
    for pname, value in result.params.items():
        np.testing.assert_allclose(np.asarray(state.params[pname]), np.asarray(value), atol=1e-8)


def test_accelerated_em_on_a_scan_hmm(x64):
    """A Gaussian HMM written with ``scan``: SQUAREM and Anderson EM reach plain EM's
    optimum in fewer iterations, never end lower, and their final log-likelihood is
    hmmlearn's at the fitted parameters (one plain fit for both: it compiles a scan
    HMM's run, the cost of this test)."""
    from hmmlearn import hmm
    from test_chain import _GAUSSIAN_INIT, _gaussian_data, gaussian_hmm

    seqs = _gaussian_data(150, 2)
    x = jnp.asarray(np.stack(seqs, axis=1))
    init = {k: jnp.asarray(v) for k, v in _GAUSSIAN_INIT.items()}
    kw = dict(max_iter=2000, tol=1e-13, init_params=init)
    plain = EM(gaussian_hmm).run(jax.random.PRNGKey(0), x, **kw)
    assert bool(plain.converged)
    ll_plain = float(plain.log_likelihood)
    for acceleration in ("squarem", "anderson"):
        fast = EM(gaussian_hmm, acceleration=acceleration).run(jax.random.PRNGKey(0), x, **kw)
        assert bool(fast.converged) and not bool(fast.diverged), acceleration
        ll_fast = float(fast.log_likelihood)
        assert ll_fast >= ll_plain - 1e-11 * abs(ll_plain), (acceleration, ll_fast, ll_plain)
        np.testing.assert_allclose(ll_fast, ll_plain, rtol=1e-9)
        assert_monotone(np.asarray(fast.history)[: int(fast.num_iters)], 1e-12)
        assert int(fast.num_iters) < int(plain.num_iters), acceleration
        ref = hmm.GaussianHMM(3, "diag")
        ref.startprob_ = np.asarray(fast.params["pi"])
        ref.transmat_ = np.asarray(fast.params["A"])
        ref.means_ = np.asarray(fast.params["mu"])
        ref.covars_ = np.asarray(fast.params["sigma"]) ** 2
        np.testing.assert_allclose(ll_fast, ref.score(np.concatenate(seqs), [150, 150]), rtol=1e-9)


# -- Anderson acceleration ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["normal", "mvn", "poisson"])
def test_anderson_reaches_the_plain_em_optimum(name, x64):
    """The zoo models of tests/models.py: Anderson ends at plain EM's optimum (the scipy
    log-likelihood at its params), never lower, with a monotone history."""
    _assert_reaches_the_plain_em_optimum(name, "anderson")


def _anderson_on_linear_map(rho, c, num_steps):
    """Anderson steps on the 1-D fixed-point map F(m) = c + rho m with an increasing
    log-likelihood (every trial accepted); the states after each step."""
    cons = {"m": constraints.real}
    step = jax.jit(partial(anderson_step, constraints=cons))
    state = init_anderson({"m": jnp.array(0.0)}, cons)
    states = []
    for i in range(num_steps):
        state = step(state, jnp.array(float(i)), {"m": c + rho * state.trial["m"]})
        states.append(state)
    return states


def test_anderson_point_on_a_linear_map(x64):
    """On a 1-D linear map with |F'| = rho < 1 the Anderson point from two EM points is the
    secant step, which lands on the fixed point c / (1 - rho) exactly; where |gamma| =
    rho / (1 - rho) exceeds the bound 1 the step is shortened to |gamma| = 1 and the bound
    grows fourfold once that point is accepted."""
    # From m0 = 0: m1 = F(0) = c; the trial after the second step is the Anderson point.
    first, second = _anderson_on_linear_map(0.4, 1.0, 2)
    assert bool(first.plain) and float(first.trial["m"]) == 1.0  # plain EM point F(0)
    assert not bool(second.plain)
    np.testing.assert_allclose(float(second.trial["m"]), 1.0 / 0.6, rtol=1e-12)
    # rho = 0.8: gamma = -4 is capped to -1: the trial is F(m1) + dG = c + rho c + rho c.
    states = _anderson_on_linear_map(0.8, 1.0, 3)
    np.testing.assert_allclose(float(states[1].trial["m"]), 1.0 + 1.6, rtol=1e-10)
    assert bool(states[1].capped) and float(states[1].step_max) == 1.0
    assert float(states[2].step_max) == 4.0


def test_anderson_safeguard_rejects_and_falls_back(x64):
    """On the univariate mixture's poor start an Anderson point lowers the
    log-likelihood: it must be rejected (counted), the current point kept, and the next
    iteration must run at exactly the plain EM point from it."""
    model, x, K, init, _ = _case("normal")
    fast, plain = EM(model, acceleration="anderson"), EM(model)
    state = fast.init(jax.random.PRNGKey(0), x, K, init_params=init)
    for _ in range(60):
        before = state
        state, log_lik = fast.update(state, x, K)
        if not bool(state.acceleration.accepted):
            break
    else:
        pytest.fail("the safeguard never fired in 60 iterations")
    assert int(state.acceleration.num_rejected) == int(before.acceleration.num_rejected) + 1
    assert not bool(before.acceleration.plain)
    # The rejected trial really is worse than the current point (independent E-step).
    current = float(jaxem.log_likelihood(model, before.params, x, K))
    trial = float(jaxem.log_likelihood(model, before.acceleration.trial, x, K))
    assert trial < current
    np.testing.assert_allclose(float(log_lik), current, rtol=1e-13)
    for pname, value in before.params.items():
        np.testing.assert_array_equal(np.asarray(state.params[pname]), np.asarray(value))
    # Next: the plain EM point from the current one, accepted without the test.
    expected, _ = plain.update(before._replace(acceleration=()), x, K)
    assert bool(state.acceleration.plain) and int(state.acceleration.count) == 0
    for pname, value in expected.params.items():
        np.testing.assert_allclose(
            np.asarray(state.acceleration.trial[pname]), np.asarray(value), rtol=1e-12
        )
    after, after_ll = fast.update(state, x, K)
    assert bool(after.acceleration.accepted)
    assert float(after_ll) >= current


def test_anderson_with_gradient_m_steps(x64):
    """Every parameter on the gradient path (optax state carried through accepted and
    rejected points): the fit reaches the closed-form EM optimum, monotonically."""
    rng = np.random.default_rng(5)
    z = rng.integers(0, 3, 300)
    x = jnp.asarray(rng.normal(np.array([-4.0, 0.0, 4.0])[z], 1.0))
    init = {"mu": jnp.array([-1.0, 0.0, 1.0])}
    reference = EM(normal_mixture).run(
        jax.random.PRNGKey(0), x, 3, max_iter=1000, tol=1e-13, init_params=init
    )
    fast = EM(normal_mixture, m_step="gradient", m_step_iters=5, acceleration="anderson").run(
        jax.random.PRNGKey(0), x, 3, max_iter=300, tol=1e-12, init_params=init
    )
    assert bool(fast.converged) and not bool(fast.diverged)
    ll_ref, ll_fast = float(reference.log_likelihood), float(fast.log_likelihood)
    assert ll_fast >= ll_ref - 1e-9 * abs(ll_ref)
    np.testing.assert_allclose(ll_fast, ll_ref, rtol=1e-9)
    assert_monotone(np.asarray(fast.history)[: int(fast.num_iters)], 1e-12)


def test_anderson_restarts_under_vmap_float32(x32):
    """Restarts under vmap equal one-at-a-time Anderson fits, in float32, and the fit
    climbs monotonically from the poor start to plain EM's optimum."""
    model, x, K, _, _ = _case("normal")
    x = x.astype(jnp.float32)
    em = EM(model, acceleration="anderson")
    init = {"mu": jnp.array([-1.0, 0.0, 1.0], jnp.float32)}
    key = jax.random.PRNGKey(1)
    result = em.run(key, x, K, max_iter=200, tol=0.0, num_restarts=2, init_params=init)
    single = em.run(key, x, K, max_iter=200, tol=0.0, init_params=init)
    plain = EM(model).run(key, x, K, max_iter=200, tol=0.0, init_params=init)
    np.testing.assert_allclose(
        np.asarray(result.restart_log_likelihoods), float(single.log_likelihood), rtol=1e-5
    )
    np.testing.assert_allclose(float(single.log_likelihood), float(plain.log_likelihood), rtol=1e-5)
    assert_monotone(np.asarray(result.history), 1e-5)


def test_anderson_frozen_and_emptied_parameters(x64):
    """A frozen parameter stays bitwise at its initial value, and an emptied mixture
    weight (exactly 0: minus infinity in unconstrained space) stays 0 with the other
    coordinates accelerated; the fit ends at plain EM's optimum."""
    model, x, K, init, _ = _case("normal")
    init = {**init, "w": jnp.array([0.5, 0.5, 0.0])}
    kw = dict(max_iter=2000, tol=1e-13, init_params=init)
    for frozen in [(), ("sigma",)]:
        plain = EM(model, frozen=frozen).run(jax.random.PRNGKey(0), x, K, **kw)
        fast = EM(model, frozen=frozen, acceleration="anderson").run(
            jax.random.PRNGKey(0), x, K, **kw
        )
        assert bool(fast.converged) and not bool(fast.diverged)
        assert float(fast.params["w"][2]) == 0.0
        for name in frozen:
            np.testing.assert_array_equal(np.asarray(fast.params[name]), np.asarray(init[name]))
        np.testing.assert_allclose(
            float(fast.log_likelihood), float(plain.log_likelihood), rtol=1e-9
        )
        assert float(fast.log_likelihood) >= float(plain.log_likelihood) - 1e-9
        assert_monotone(np.asarray(fast.history)[: int(fast.num_iters)], 1e-12)
