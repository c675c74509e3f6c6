"""Gaussian mixture EM: jaxem vs scikit-learn vs a hand-written jit-compiled JAX EM.

All implementations fit the same data (sampled from a random Gaussian mixture
with a fixed seed) from the same initial parameters for exactly 50 EM
iterations, with full and diagonal covariances. Reported per configuration and
implementation: time per iteration without compilation (best of a few warm
runs, divided by the number of iterations), compilation time (first call minus
a warm call), and the log-likelihood at the final parameters.

Implementations:

* ``sklearn``: ``sklearn.mixture.GaussianMixture`` with ``max_iter=50, tol=0``
  and ``weights_init`` / ``means_init`` / ``precisions_init``, BLAS threads set
  to the number of CPUs with threadpoolctl.
* ``sklearn-1t``: the same with one BLAS thread. NumPy and SciPy each bring
  their own OpenBLAS; with more than one thread each, they contend for the
  cores on the many tiny per-component calls of GaussianMixture, which on two
  cores makes the full-covariance fit several times slower. The speedups in
  the table are relative to the faster of the two sklearn rows.
* ``hand``: the E-step and M-step below, written directly in JAX and run for a
  fixed number of iterations in one ``jax.jit``-compiled ``lax.scan``.
* ``jaxem``: ``jaxem.EM(model).run(key, x, K, max_iter=50, tol=0.0, init_params=...)``.
* ``jaxem-update``: 50 calls of the jit-compiled ``jaxem.EM.update`` from Python.

Usage::

    python benchmarks/gmm.py --all                 # float32 and float64, both sizes
    python benchmarks/gmm.py --all --quick         # only (N, D, K) = (10 000, 2, 3)
    python benchmarks/gmm.py --dtype float64 --sizes 100000,16,16 --json out.json

float64 needs ``jax_enable_x64``, which is global to a process, so ``--all``
runs one child process per dtype and merges their results.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np

SIZES = ((10_000, 2, 3), (100_000, 16, 16))
QUICK_SIZES = SIZES[:1]
IMPLS = ("sklearn", "sklearn-1t", "hand", "jaxem", "jaxem-update")
SKLEARN_IMPLS = ("sklearn", "sklearn-1t")
NUM_ITERS = 50
REG_COVAR = 1e-6
DATA_SEED = 0
INIT_SEED = 1


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--all", action="store_true", help="both dtypes, one child process each")
    parser.add_argument("--quick", action="store_true", help="only the small configuration")
    parser.add_argument(
        "--sizes",
        type=str,
        default=None,
        help="semicolon-separated N,D,K triples, e.g. '10000,2,3;100000,16,16'",
    )
    parser.add_argument(
        "--cov", type=str, default="full,diag", help="comma-separated covariance types"
    )
    parser.add_argument(
        "--impls",
        type=str,
        default=",".join(IMPLS),
        help="comma-separated subset of " + ",".join(IMPLS),
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="warm runs per timing; the best is kept"
    )
    parser.add_argument(
        "--matmul-precision",
        choices=("default", "high", "highest"),
        default="default",
        help="jax_default_matmul_precision for the JAX rows; 'highest' disables TF32 on GPUs",
    )
    parser.add_argument("--json", type=str, default=None, help="write the results to this file")
    return parser.parse_args(argv)


def _sizes(args):
    if args.sizes:
        return tuple(tuple(int(v) for v in triple.split(",")) for triple in args.sizes.split(";"))
    return QUICK_SIZES if args.quick else SIZES


# ---------------------------------------------------------------------------
# Hand-written JAX EM (the baseline a JAX user would write for this one model).
# ---------------------------------------------------------------------------


def _hand_written_em():
    """Builds the jit-compiled hand-written EM (imports JAX only when called)."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import logsumexp

    log_2pi = math.log(2.0 * math.pi)

    def log_joint_full(x, weights, means, chol):
        # log w_k + log N(x_n | mu_k, L_k L_k^T), shape (N, K). With
        # A_k = L_k^{-1}, the Mahalanobis term is |A_k x_n - A_k mu_k|^2: one
        # (N, D) x (D, K*D) matmul for all components.
        num_features = x.shape[-1]
        eye = jnp.broadcast_to(jnp.eye(num_features, dtype=x.dtype), chol.shape)
        chol_inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
        y = jnp.einsum("nd,ked->nke", x, chol_inv) - jnp.einsum("kd,ked->ke", means, chol_inv)
        mahalanobis = jnp.sum(jnp.square(y), axis=-1)
        half_log_det = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        return jnp.log(weights) - half_log_det - 0.5 * (num_features * log_2pi + mahalanobis)

    def m_step_full(x, outer, resp):
        num_features = x.shape[-1]
        counts = resp.sum(0) + 10 * jnp.finfo(x.dtype).eps
        means = (resp.T @ x) / counts[:, None]
        # The sufficient statistics x_n x_n^T are computed once, outside the
        # loop, so sum_n r_nk x_n x_n^T is one (K, N) x (N, D*D) matmul. The
        # data are centred first, so these uncentred moments lose little
        # precision.
        second_moments = (resp.T @ outer).reshape(-1, num_features, num_features) / counts[
            :, None, None
        ]
        covariances = second_moments - means[:, :, None] * means[:, None, :]
        covariances = covariances + REG_COVAR * jnp.eye(num_features, dtype=x.dtype)
        return counts / counts.sum(), means, jnp.linalg.cholesky(covariances)

    def log_joint_diag(x, x2, weights, means, sigma):
        num_features = x.shape[-1]
        precision = 1.0 / jnp.square(sigma)
        mahalanobis = (
            x2 @ precision.T
            - 2.0 * (x @ (means * precision).T)
            + jnp.sum(jnp.square(means) * precision, -1)
        )
        return (
            jnp.log(weights)
            - jnp.sum(jnp.log(sigma), -1)
            - 0.5 * (num_features * log_2pi + mahalanobis)
        )

    def m_step_diag(x, x2, resp):
        counts = resp.sum(0) + 10 * jnp.finfo(x.dtype).eps
        means = (resp.T @ x) / counts[:, None]
        variances = (resp.T @ x2) / counts[:, None] - jnp.square(means) + REG_COVAR
        return counts / counts.sum(), means, jnp.sqrt(variances)

    def fit(x, weights, means, scale, *, cov_type, num_iters):
        """Runs ``num_iters`` EM iterations.

        Args:
            x: data, (N, D).
            weights: (K,).
            means: (K, D).
            scale: lower Cholesky factors (K, D, D) for ``"full"``, standard
                deviations (K, D) for ``"diag"``.

        Returns:
            (weights, means, scale) after ``num_iters`` updates, the
            log-likelihood at those parameters, and the log-likelihood before
            each update, shape (num_iters,).
        """
        shift = x.mean(0)
        x = x - shift
        if cov_type == "full":
            outer = (x[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)
            log_joint_fn = lambda params: log_joint_full(x, *params)  # noqa: E731
            m_step_fn = lambda resp: m_step_full(x, outer, resp)  # noqa: E731
        else:
            x2 = jnp.square(x)
            log_joint_fn = lambda params: log_joint_diag(x, x2, *params)  # noqa: E731
            m_step_fn = lambda resp: m_step_diag(x, x2, resp)  # noqa: E731

        def em_step(params, _):
            log_joint = log_joint_fn(params)
            log_norm = logsumexp(log_joint, axis=1, keepdims=True)
            return m_step_fn(jnp.exp(log_joint - log_norm)), log_norm.sum()

        params = (weights, means - shift, scale)
        params, history = jax.lax.scan(em_step, params, None, length=num_iters)
        log_likelihood = logsumexp(log_joint_fn(params), axis=1).sum()
        weights, means, scale = params
        return (weights, means + shift, scale), log_likelihood, history

    return jax.jit(fit, static_argnames=("cov_type", "num_iters"))


# ---------------------------------------------------------------------------
# The implementations. Each ``prepare_*`` returns ``(fit, finish)``: ``fit()``
# runs the 50 iterations (the call that is timed), ``finish(value)`` turns its
# value into the final log-likelihood, the means and the iterations done.
# ---------------------------------------------------------------------------


def _scale_name(cov_type):
    return "L" if cov_type == "full" else "sigma"


def prepare_sklearn(x, init, cov_type, num_iters, *, num_threads=None):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    if cov_type == "full":
        chol_inv = np.linalg.inv(init["L"].astype(np.float64))
        precisions = np.swapaxes(chol_inv, -1, -2) @ chol_inv
    else:
        precisions = 1.0 / np.square(init["sigma"].astype(np.float64))
    model = GaussianMixture(
        n_components=init["w"].shape[0],
        covariance_type=cov_type,
        tol=0.0,
        reg_covar=REG_COVAR,
        max_iter=num_iters,
        # The *_init arrays override the initialization; "random" keeps the unused one cheap.
        init_params="random",
        weights_init=init["w"].astype(x.dtype),
        means_init=init["mu"].astype(x.dtype),
        precisions_init=precisions.astype(x.dtype),
        random_state=0,
    )

    def fit():
        with threadpool_limits(limits=num_threads or os.cpu_count()), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return model.fit(x)

    def finish(fitted):
        return float(fitted.score(x) * x.shape[0]), fitted.means_, int(fitted.n_iter_)

    return fit, finish


def prepare_hand(x, init, cov_type, num_iters):
    import jax.numpy as jnp

    fit = _hand_written_em()
    args = (
        jnp.asarray(x),
        *(jnp.asarray(init[name], x.dtype) for name in ("w", "mu", _scale_name(cov_type))),
    )

    def finish(value):
        params, log_likelihood, _ = value
        return float(log_likelihood), np.asarray(params[1]), num_iters

    return lambda: fit(*args, cov_type=cov_type, num_iters=num_iters), finish


def _jaxem_setup(x, init, cov_type):
    import jax
    from common import MODELS

    import jaxem

    model = MODELS[cov_type]
    init_params = {name: jax.numpy.asarray(value, x.dtype) for name, value in init.items()}
    return jaxem, model, jaxem.EM(model), jax.numpy.asarray(x), init["w"].shape[0], init_params


def prepare_jaxem(x, init, cov_type, num_iters):
    import jax

    _, _, em, x, num_components, init_params = _jaxem_setup(x, init, cov_type)
    key = jax.random.PRNGKey(0)

    def fit():
        return em.run(key, x, num_components, max_iter=num_iters, tol=0.0, init_params=init_params)

    def finish(result):
        done = int(result.num_iters)
        if done != num_iters:
            print(
                f"WARNING: jaxem stopped after {done} of {num_iters} iterations with tol=0 "
                f"(converged={bool(result.converged)}, diverged={bool(result.diverged)}); "
                "ms/iter divides by the iterations done",
                flush=True,
            )
        return float(result.log_likelihood), np.asarray(result.params["mu"]), done

    return fit, finish


def prepare_jaxem_update(x, init, cov_type, num_iters):
    import jax

    jaxem, model, em, x, num_components, init_params = _jaxem_setup(x, init, cov_type)
    state = em.init(jax.random.PRNGKey(0), x, num_components, init_params=init_params)

    def fit():
        current = state
        for _ in range(num_iters):
            current, _ = em.update(current, x, num_components)
        return current

    def finish(final_state):
        params = em.get_params(final_state)
        log_likelihood = jaxem.log_likelihood(model, params, x, num_components)
        return float(log_likelihood), np.asarray(params["mu"]), num_iters

    return fit, finish


PREPARE = {
    "sklearn": prepare_sklearn,
    "sklearn-1t": lambda *args: prepare_sklearn(*args, num_threads=1),
    "hand": prepare_hand,
    "jaxem": prepare_jaxem,
    "jaxem-update": prepare_jaxem_update,
}


def bench_config(impls, x, init, cov_type, num_iters, repeats):
    """Times every implementation on one configuration.

    The warm runs are interleaved (one of each implementation per round) so
    that a burst of load from elsewhere on the machine hits all of them alike;
    each keeps its best round.

    Returns:
        ``{impl: result dict}``.
    """
    from common import first_call, warm_call

    fits, finishes, values, results = {}, {}, {}, {}
    for impl in impls:
        fits[impl], finishes[impl] = PREPARE[impl](x, init, cov_type, num_iters)
        first, compile_s, values[impl] = first_call(fits[impl])
        results[impl] = {
            "first_call_s": first,
            "compile_s": None if impl in SKLEARN_IMPLS else compile_s,
        }
    best = dict.fromkeys(impls, np.inf)
    for _ in range(repeats):
        for impl in impls:
            seconds, values[impl] = warm_call(fits[impl])
            best[impl] = min(best[impl], seconds)
    for impl in impls:
        final_loglik, means, done = finishes[impl](values[impl])
        results[impl].update(
            ms_per_iter=1e3 * best[impl] / done,
            num_iters=done,
            final_loglik=final_loglik,
            means=means,
        )
    return results


def run_dtype(args):
    """Runs every configuration of one dtype in this process."""
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.matmul_precision != "default":
        # On GPUs the default lets float32 matmuls run in TF32 (10-bit
        # mantissa), which moves the float32 log-likelihoods ~1e-4 away from
        # scikit-learn's.
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    from common import initial_params, metadata, sample_gmm

    impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
    records = []
    for num_samples, num_features, num_components in _sizes(args):
        x64 = sample_gmm(DATA_SEED, num_samples, num_features, num_components)
        x = x64.astype(args.dtype)
        for cov_type in args.cov.split(","):
            init = initial_params(INIT_SEED, x64, num_components, cov_type)
            results = bench_config(impls, x, init, cov_type, NUM_ITERS, args.repeats)
            means = {impl: results[impl].pop("means") for impl in impls}
            for impl in impls:
                record = {
                    "N": num_samples,
                    "D": num_features,
                    "K": num_components,
                    "cov": cov_type,
                    "dtype": args.dtype,
                    "impl": impl,
                    **results[impl],
                    "jaxem_sources_sha256": metadata()["jaxem_sources_sha256"],
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "matmul_precision": args.matmul_precision,
                    "backend": jax.default_backend(),
                }
                if "sklearn" in means and impl not in SKLEARN_IMPLS:
                    record["max_abs_mean_diff_vs_sklearn"] = float(
                        np.max(np.abs(means[impl] - means["sklearn"]))
                    )
                records.append(record)
                print(_format_row(record, records), flush=True)
    return records


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------

HEADER = (
    f"{'config':<34} {'impl':<13} {'ms/iter':>9} {'compile s':>9} {'final loglik':>19} "
    f"{'rel.diff ll':>11} {'speedup vs sk':>13} {'time/hand':>9}"
)


def _config(record):
    return f"N={record['N']} D={record['D']} K={record['K']} {record['cov']} {record['dtype']}"


def _reference(records, record, impl):
    for other in records:
        if other["impl"] == impl and _config(other) == _config(record):
            return other
    return None


def _format_row(record, records):
    sklearn_rows = [
        row
        for row in (_reference(records, record, impl) for impl in SKLEARN_IMPLS)
        if row is not None
    ]
    sklearn = sklearn_rows[0] if sklearn_rows else None
    sklearn_ms = min((row["ms_per_iter"] for row in sklearn_rows), default=None)
    hand = _reference(records, record, "hand")
    compile_s = "-" if record["compile_s"] is None else f"{record['compile_s']:.2f}"
    rel_diff = speedup = time_hand = "-"
    if sklearn is not None:
        reference = sklearn["final_loglik"]
        rel_diff = f"{abs(record['final_loglik'] - reference) / abs(reference):.1e}"
        speedup = f"{sklearn_ms / record['ms_per_iter']:.2f}x"
    if hand is not None:
        time_hand = f"{record['ms_per_iter'] / hand['ms_per_iter']:.2f}x"
    return (
        f"{_config(record):<34} {record['impl']:<13} {record['ms_per_iter']:>9.3f} {compile_s:>9} "
        f"{record['final_loglik']:>19.8f} {rel_diff:>11} {speedup:>13} {time_hand:>9}"
    )


def _targets(records):
    """Checks the performance targets of the project on the jaxem rows."""
    lines = []
    for record in records:
        if record["impl"] != "jaxem":
            continue
        sklearn_ms = min(
            (
                row["ms_per_iter"]
                for row in (_reference(records, record, impl) for impl in SKLEARN_IMPLS)
                if row
            ),
            default=None,
        )
        hand = _reference(records, record, "hand")
        checks = []
        if sklearn_ms is not None:
            speedup = sklearn_ms / record["ms_per_iter"]
            if (record["N"], record["D"], record["K"]) == SIZES[0]:
                checks.append(("speedup vs sklearn >= 3", speedup >= 3.0, f"{speedup:.2f}x"))
            elif (record["N"], record["D"], record["K"]) == SIZES[1] and record[
                "dtype"
            ] == "float64":
                checks.append(("speedup vs sklearn >= 1.5", speedup >= 1.5, f"{speedup:.2f}x"))
        if hand is not None:
            ratio = record["ms_per_iter"] / hand["ms_per_iter"]
            checks.append(("time/hand <= 1.25", ratio <= 1.25, f"{ratio:.2f}x"))
        checks.append(("compile < 5 s", record["compile_s"] < 5.0, f"{record['compile_s']:.2f} s"))
        for name, ok, value in checks:
            lines.append(f"{'PASS' if ok else 'FAIL'}  {_config(record):<34} {name:<26} {value}")
    return lines


def print_report(records):
    print()
    print(HEADER)
    print("-" * len(HEADER))
    for record in records:
        print(_format_row(record, records))
    print()
    print(
        "ms/iter: best warm run / iterations. "
        "compile s: tracing + lowering + XLA compilation during the"
    )
    print("first call, as reported by jax.monitoring (sklearn: none).")
    print(
        "rel.diff ll: |loglik - sklearn loglik| / |sklearn loglik|. "
        "speedup vs sk: best sklearn ms/iter / ms/iter."
    )
    print("time/hand: ms/iter / hand-written JAX ms/iter.")
    targets = _targets(records)
    if targets:
        print()
        print("Targets (jaxem run):")
        print("\n".join(targets))


def run_all(args, argv):
    """Re-invokes this script once per dtype and merges the results."""
    records = []
    forwarded = [arg for arg in argv if arg not in ("--all",)]
    if "--json" in forwarded:
        index = forwarded.index("--json")
        del forwarded[index : index + 2]
    forwarded = [arg for arg in forwarded if not arg.startswith("--json=")]
    for dtype in ("float32", "float64"):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "records.json")
            command = [
                sys.executable,
                os.path.abspath(__file__),
                *forwarded,
                "--dtype",
                dtype,
                "--json",
                path,
            ]
            print(f"$ {' '.join(command)}", flush=True)
            subprocess.run(command, check=True)
            with open(path) as f:
                records.extend(json.load(f)["records"])
    return records


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    # The benchmarks measure the checkout they live in, installed or not.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    from common import metadata

    meta = metadata()
    print(
        f"CPUs: {meta['cpu_count']}, load average: {meta['load_average'][0]:.2f}, "
        f"XLA_FLAGS: {meta['xla_flags']!r}, iterations: {NUM_ITERS}, repeats: {args.repeats}",
        flush=True,
    )
    records = run_all(args, argv) if args.all else run_dtype(args)
    print_report(records)
    meta["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
