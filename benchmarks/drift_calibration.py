"""The level of SAEM's drift test (issue 17) on AR(1) chains without trend, with and
without its autocorrelation correction, and its power on the same chains with a
trend; optionally, a summary of fits saved by benchmarks/drift_calibration_fits.py.

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/drift_calibration.py [fits.npz ...]
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxem.monte_carlo_stationarity as mcs

jax.config.update("jax_enable_x64", True)


def ar1(steps, reps, phi, rng):
    x = np.zeros((steps, reps))
    x[0] = rng.normal(size=reps) / np.sqrt(1 - phi**2)
    for k in range(1, steps):
        x[k] = phi * x[k - 1] + rng.normal(size=reps)
    return x


def synthetic(reps=20000):
    rng = np.random.default_rng(0)
    print("steps  phi   plain<.01 plain<.05 | corr.<.01 corr.<.05 | power<.01  ESS<3")
    for steps in (150, 500):
        for phi in (0.0, 0.5, 0.8, 0.9, 0.95, 0.98):
            x = ar1(steps, reps, phi, rng)
            p0 = np.asarray(mcs.drift_t_test(jnp.asarray(x), 10, correct=False)[2])
            _, _, p, ess = (np.asarray(a) for a in mcs.drift_t_test(jnp.asarray(x), 10))
            # A trend of 0.2 marginal sd per 10 % of 150 iterations.
            trend = x + 0.02 * 150 / steps * np.arange(steps)[:, None] / np.sqrt(1 - phi**2)
            pt = np.asarray(mcs.drift_t_test(jnp.asarray(trend), 10)[2])
            print(
                f"{steps:5d} {phi:5.2f} {np.mean(p0 < 0.01):9.4f} {np.mean(p0 < 0.05):9.4f} |"
                f" {np.mean(p < 0.01):9.4f} {np.mean(p < 0.05):9.4f} | {np.mean(pt < 0.01):9.4f}"
                f" {np.mean(ess < mcs.MIN_DRIFT_ESS):6.4f}"
            )


def fits(path):
    rows = np.load(path)["rows"]
    drift, score, gain, converged, ess = rows.T
    print(
        f"{path}: {len(rows)} fits; drift p (Bonferroni) < .01: {np.mean(drift < 0.01):.3f}, "
        f"< .05: {np.mean(drift < 0.05):.3f}; ESS < {mcs.MIN_DRIFT_ESS:g}: "
        f"{np.mean(ess < mcs.MIN_DRIFT_ESS):.3f} (min {ess.min():.1f}); score p < 1e-3: "
        f"{np.mean(score < 1e-3):.3f}, < .01: {np.mean(score < 0.01):.3f}, < .05: "
        f"{np.mean(score < 0.05):.3f}; max gain {np.nanmax(gain):.3f}; converged "
        f"{np.mean(converged):.3f}"
    )


if __name__ == "__main__":
    synthetic()
    for path in sys.argv[1:]:
        fits(path)
