"""A two-state Gaussian HMM on speed-accuracy switching, with the decoded states.

Data: one participant's log response times in a lexical decision task (Dutilh
et al. 2011, shipped with the R package depmixS4), three series of 168, 134 and
137 trials. The participant switches between a fast guessing mode and a slow,
accurate mode, which the classic depmixS4 example models as a two-state
Gaussian HMM:

    z_1 ~ Categorical(pi),   z_t | z_{t-1} ~ Categorical(A[z_{t-1}]),
    rt_t | z_t ~ Normal(mu[z_t], sigma[z_t]).

The three series have different lengths: they are padded to the longest and a
mask marks the real trials (``numpyro.handlers.mask`` around the latent and
the observation of each step). Every parameter has a closed-form M-step; the
fit reaches depmixS4's log-likelihood of -84.34, it is checked against hmmlearn
from the same initial values, and the Viterbi path (``jaxem.map_assignment``)
against hmmlearn's ``decode``.

References: G. Dutilh, E.-J. Wagenmakers, I. Visser, H. L. J. van der Maas,
"A phase transition model for the speed-accuracy trade-off in response time
experiments", Cognitive Science 35, 211-250 (2011); I. Visser, M. Speekenbrink,
"depmixS4: an R package for hidden Markov models", J. Stat. Softw. 36 (2010).

Run from the repository root::

    python examples/hmm_speed.py
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from matplotlib.figure import Figure
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

import jaxem
from jaxem import EM

QUICK = os.environ.get("JAXEM_EXAMPLE_QUICK") == "1"
DATA = Path(__file__).resolve().parents[1] / "data" / "speed.csv"
LENGTHS = (168, 134, 137)


def speed_hmm(rt, mask, K=2):
    """rt, mask: (T, N) padded series and their real trials."""
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.full((K, K), 0.2) + 0.6 * jnp.eye(K), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([5.5, 6.5]))
    sigma = numpyro.param("sigma", jnp.full(K, 0.5), constraint=constraints.positive)
    with numpyro.plate("series", rt.shape[1]):
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("rt0", dist.Normal(mu[z0], sigma[z0]), obs=rt[0])

    def trial(z_prev, inputs):
        rt_t, m_t = inputs
        with numpyro.plate("series", rt.shape[1]), numpyro.handlers.mask(mask=m_t):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("rt", dist.Normal(mu[z], sigma[z]), obs=rt_t)
        return z, None

    scan(trial, z0, (rt[1:], mask[1:]))


def main():
    jax.config.update("jax_enable_x64", True)
    rt_all = np.genfromtxt(DATA, delimiter=",", names=True, dtype=None, encoding="utf-8")["rt"]
    series = np.split(rt_all, np.cumsum(LENGTHS)[:-1])
    rt = np.full((max(LENGTHS), len(LENGTHS)), rt_all.mean())  # padding: finite, masked
    mask = np.zeros(rt.shape, bool)
    for i, s in enumerate(series):
        rt[: len(s), i], mask[: len(s), i] = s, True
    rt, mask = jnp.asarray(rt), jnp.asarray(mask)

    em = EM(speed_hmm, reg_covar=0.0)
    print(em.m_step_paths(rt, mask))
    num_iters = 30 if QUICK else 200
    result = em.run(jax.random.PRNGKey(0), rt, mask, max_iter=num_iters, tol=1e-10)
    params = {k: np.asarray(v) for k, v in result.params.items()}
    print(f"{int(result.num_iters)} iterations, log-likelihood {float(result.log_likelihood):.4f}")
    print("means", params["mu"].round(3), "sds", params["sigma"].round(3))
    print("transition matrix\n", params["A"].round(3))

    # The same fit by hmmlearn, from the same start, for as many iterations.
    from hmmlearn import hmm

    ref = hmm.GaussianHMM(
        2,
        "diag",
        init_params="",
        n_iter=int(result.num_iters),
        tol=0,
        covars_prior=0,
        covars_weight=0,
    )
    ref.startprob_, ref.transmat_ = np.array([0.5, 0.5]), np.array([[0.8, 0.2], [0.2, 0.8]])
    ref.means_, ref.covars_ = np.array([[5.5], [6.5]]), np.full((2, 1), 0.25)
    ref.fit(rt_all[:, None], lengths=LENGTHS)
    print(f"hmmlearn log-likelihood {ref.score(rt_all[:, None], LENGTHS):.4f}")
    # depmixS4's documented fit of this model (Visser & Speekenbrink 2010): logLik -84.34.
    assert abs(float(result.log_likelihood) - (-84.34)) < 0.01
    np.testing.assert_allclose(
        float(result.log_likelihood), ref.score(rt_all[:, None], LENGTHS), rtol=1e-8
    )
    np.testing.assert_allclose(params["mu"], ref.means_[:, 0], rtol=1e-6)

    decoded = jaxem.map_assignment(speed_hmm, result.params, rt, mask)
    paths = [
        np.concatenate([np.asarray(decoded["z0"])[i : i + 1], np.asarray(decoded["z"])[: n - 1, i]])
        for i, n in enumerate(LENGTHS)
    ]
    np.testing.assert_array_equal(np.concatenate(paths), ref.decode(rt_all[:, None], LENGTHS)[1])
    slow = int(np.argmax(params["mu"]))
    print(f"trials decoded in the slow state: {np.mean(np.concatenate(paths) == slow):.1%}")

    fig = Figure(figsize=(9, 5), layout="tight")
    axes = fig.subplots(len(LENGTHS), 1, sharey=True)
    for i, (ax, s, path) in enumerate(zip(axes, series, paths)):
        ax.plot(s, color="gray", lw=0.8, label="log RT")
        ax.scatter(np.arange(len(s)), s, c=np.where(path == slow, "tab:blue", "tab:orange"), s=8)
        ax.set(ylabel=f"series {i + 1}")
    axes[0].set_title("log response time; Viterbi states: blue slow/accurate, orange fast/guessing")
    axes[-1].set_xlabel("trial")
    fig.savefig("hmm_speed.png", dpi=120)
    print("saved hmm_speed.png")


if __name__ == "__main__":
    main()
