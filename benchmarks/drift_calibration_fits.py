"""Settled SAEM fits over many seeds: the drift and score p-values of their
convergence checks (issue 17). Saves the first-phase param histories so that drift
statistics can be recalibrated offline (benchmarks/drift_calibration.py).

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python \
        benchmarks/drift_calibration_fits.py lmm 300 out.npz [K1 (300)]
"""

import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import jaxem

# The sleepstudy model the tests fit too (tests/models.py), written once.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import sleepstudy_model  # noqa: E402

jax.config.update("jax_enable_x64", True)


def lmm_model(group, y, num_groups=30):
    mu = numpyro.param("mu", 0.0)
    tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("g", num_groups):
        b = numpyro.sample("b", dist.Normal(mu, tau))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(b[group], sigma), obs=y)


def problem(name):
    if name == "lmm":
        rng = np.random.default_rng(0)
        group = np.repeat(np.arange(30), 10)
        y = 1.0 + 0.8 * rng.normal(size=30)[group] + rng.normal(size=300)
        return lmm_model, (jnp.asarray(group), jnp.asarray(y))
    data = np.loadtxt("/work/shared/data/sleepstudy.csv", delimiter=",", skiprows=1)
    y, days = data[:, 0], data[:, 1]
    subject = np.unique(data[:, 2], return_inverse=True)[1]
    return sleepstudy_model, (jnp.asarray(days), jnp.asarray(subject), jnp.asarray(y))


def main(name, seeds, out, k1=300):
    """Fit ``seeds`` times; save ``rows``: (drift p, score p, gain, converged, drift
    ess) per fit, and the param histories of the last half of the first phase."""
    model, args = problem(name)
    em = jaxem.SAEM(model, schedule=(k1, 100))
    k1 = em.schedule[0]
    rows, hist = [], []
    for seed in range(seeds):
        t0 = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = em.run(jax.random.PRNGKey(seed), *args)
        st = r.stationarity
        rows.append(
            [
                float(r.drift.p_value),
                float(st.p_value),
                float(st.gain),
                float(bool(r.converged)),
                float(r.drift.ess),
            ]
        )
        hist.append({k: np.asarray(v)[k1 // 2 - 10 : k1] for k, v in r.param_history.items()})
        print(seed, rows[-1], f"{time.process_time() - t0:.1f} CPU s", flush=True)
        np.savez(
            out,
            rows=np.array(rows),
            k1=k1,
            **{k: np.stack([h[k] for h in hist]) for k in hist[0]},
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:]))
