"""EM vs NumPyro SVI with TraceEnum_ELBO on one Gaussian mixture, float64.

What a NumPyro user does today to fit a mixture by maximum likelihood is SVI
with an empty guide on the ``config_enumerate``-d model: with no latent left
for the guide, ``-ELBO`` is exactly ``-log p(x | theta)``, so SVI is gradient
ascent (Adam) on the marginal log-likelihood. jaxem fits the same model by EM.
Both start from the same initial parameters on the same data (overlapping
components, so EM needs many iterations). For each method the script records
the log-likelihood after every iteration (EM: ``EMResult.history`` of a run
with ``tol=0``; SVI: ``-losses`` of ``svi.run``), and reports the iterations
and the seconds (iterations x warm time per iteration, compilation excluded)
from which on the log-likelihood stays within 1e-2, 1e-3 and 1e-4 nats per
data point of the optimum, the optimum being the log-likelihood after a long EM run.
The hand-written JAX EM of ``gmm.py`` runs too, as a check of the optimum.

Usage::

    python benchmarks/em_vs_svi.py                       # N=10 000, D=2, K=3, full covariance
    python benchmarks/em_vs_svi.py --lrs 0.01,0.05,0.1 --svi-steps 20000 --json out.json
"""

import argparse
import json
import os
import sys
import time

import numpy as np

TOLERANCES = (1e-2, 1e-3, 1e-4)
MAIN_TOLERANCE = 1e-3
DATA_SEED = 2
INIT_SEED = 1


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of data points N")
    parser.add_argument("--d", type=int, default=2, help="dimension D")
    parser.add_argument("--k", type=int, default=3, help="number of components K")
    parser.add_argument("--cov", choices=("full", "diag"), default="full")
    parser.add_argument(
        "--mean-scale",
        type=float,
        default=1.0,
        help="spread of the true means (small: overlapping)",
    )
    parser.add_argument(
        "--lrs",
        type=str,
        default="0.01,0.05,0.1",
        help="comma-separated Adam learning rates for SVI",
    )
    parser.add_argument(
        "--svi-steps", type=int, default=3_000, help="SVI steps recorded per learning rate"
    )
    parser.add_argument(
        "--em-iters",
        type=int,
        default=5_000,
        help="EM iterations (the last one defines the optimum)",
    )
    parser.add_argument(
        "--timing-steps", type=int, default=500, help="length of the warm runs timed per method"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="warm runs per timing; the best is kept"
    )
    parser.add_argument(
        "--json", type=str, default=None, help="write results and trajectories to this file"
    )
    return parser.parse_args(argv)


def _iterations_to(log_liks, optimum, num_samples, tolerance):
    """First t from which on the log-likelihood stays within tolerance (nats per point).

    ``log_liks[t]`` is the log-likelihood after t updates. Adam can leave the
    band again after entering it, hence "stays".
    """
    gap = (optimum - np.asarray(log_liks)) / num_samples
    worst_from_here = np.maximum.accumulate(gap[::-1])[::-1]
    hits = np.flatnonzero(worst_from_here <= tolerance)
    return int(hits[0]) if hits.size else None


def _time_svi_steps(svi, rng_key, x, num_components, init, args):
    """Warm seconds and compilation seconds of ``args.timing_steps`` SVI steps.

    ``svi.run`` traces and compiles its scan on every call; this times the same
    scan of ``svi.update`` under ``jax.jit`` to separate compilation from steps.
    """
    import jax
    from common import time_call

    state = svi.init(rng_key, x, num_components, init_params=init)

    def body(svi_state, _):
        return svi.update(svi_state, x, num_components)

    steps = jax.jit(lambda s: jax.lax.scan(body, s, None, length=args.timing_steps))
    _, best, compile_s, _ = time_call(lambda: steps(state), num_repeats=args.repeats)
    return best, compile_s


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpyro
    from common import MODELS, initial_params, metadata, sample_gmm, time_call
    from gmm import _hand_written_em
    from numpyro.contrib.funsor import config_enumerate
    from numpyro.infer import SVI, TraceEnum_ELBO

    import jaxem

    meta = metadata()
    print(
        f"load average: {meta['load_average'][0]:.2f}, XLA_FLAGS: {meta['xla_flags']!r}", flush=True
    )
    num_samples, num_components = args.n, args.k
    x_np = sample_gmm(DATA_SEED, num_samples, args.d, num_components, mean_scale=args.mean_scale)
    init_np = initial_params(INIT_SEED, x_np, num_components, args.cov)
    x = jnp.asarray(x_np)
    init = {name: jnp.asarray(value) for name, value in init_np.items()}
    model = MODELS[args.cov]
    key = jax.random.PRNGKey(0)
    rows, trajectories = [], {}

    # EM: one long run gives both the trajectory and the optimum.
    em = jaxem.EM(model)
    start = time.perf_counter()
    result = em.run(key, x, num_components, max_iter=args.em_iters, tol=0.0, init_params=init)
    jax.block_until_ready(result)
    em_wall = time.perf_counter() - start
    optimum = float(result.log_likelihood)
    em_history = np.asarray(result.history)
    _, best, compile_s, _ = time_call(
        lambda: em.run(
            key, x, num_components, max_iter=args.timing_steps, tol=0.0, init_params=init
        ),
        num_repeats=args.repeats,
    )
    rows.append(("jaxem EM", "-", em_history, best / args.timing_steps, compile_s, em_wall))
    trajectories["jaxem EM"] = em_history
    print(
        f"jaxem EM: {args.em_iters} iterations in {em_wall:.2f} s (first call), "
        f"optimum {optimum:.10f}",
        flush=True,
    )

    # Hand-written EM: the same optimum from an independent implementation.
    fit = _hand_written_em()
    scale_name = "L" if args.cov == "full" else "sigma"
    hand_args = (x, init["w"], init["mu"], init[scale_name])
    _, hand_log_lik, hand_history = jax.block_until_ready(
        fit(*hand_args, cov_type=args.cov, num_iters=args.em_iters)
    )
    _, best, hand_compile, _ = time_call(
        lambda: fit(*hand_args, cov_type=args.cov, num_iters=args.timing_steps),
        num_repeats=args.repeats,
    )
    hand_history = np.asarray(hand_history)
    rows.append(
        ("hand-written EM", "-", hand_history, best / args.timing_steps, hand_compile, None)
    )
    trajectories["hand-written EM"] = hand_history
    print(
        f"hand-written EM: optimum {float(hand_log_lik):.10f} "
        f"(jaxem - hand: {optimum - float(hand_log_lik):.3e})"
    )

    # SVI with TraceEnum_ELBO and an empty guide, for each learning rate.
    def guide(*args, **kwargs):
        pass

    enumerated_model = config_enumerate(model)
    svi_finals = {}
    for lr in (float(lr) for lr in args.lrs.split(",")):
        svi = SVI(enumerated_model, guide, numpyro.optim.Adam(lr), TraceEnum_ELBO())
        start = time.perf_counter()
        svi_result = svi.run(
            key, args.svi_steps, x, num_components, progress_bar=False, init_params=init
        )
        jax.block_until_ready(svi_result)
        svi_wall = time.perf_counter() - start
        svi_log_liks = -np.asarray(svi_result.losses)
        svi_finals[lr] = float(jaxem.log_likelihood(model, svi_result.params, x, num_components))

        best, compile_s = _time_svi_steps(svi, key, x, num_components, init, args)
        name = f"SVI Adam lr={lr:g}"
        rows.append((name, f"{lr:g}", svi_log_liks, best / args.timing_steps, compile_s, svi_wall))
        trajectories[name] = svi_log_liks
        print(
            f"{name}: {args.svi_steps} steps, svi.run wall {svi_wall:.2f} s; "
            f"first -loss {svi_log_liks[0]:.6f} "
            f"(EM history[0] {em_history[0]:.6f}); final log-lik {svi_finals[lr]:.6f}",
            flush=True,
        )

    header = (
        f"{'method':<20} "
        + " ".join(f"{'iters to ' + format(t, 'g'):>13}" for t in TOLERANCES)
        + f" {'s to ' + format(MAIN_TOLERANCE, 'g'):>10} {'ms/iter':>9} {'compile s':>9}"
        + f" {'run wall s':>10} {'final gap/pt':>13}"
    )
    lines = [header, "-" * len(header)]
    records = []
    for name, lr, log_liks, seconds_per_iter, compile_s, wall in rows:
        iters = {t: _iterations_to(log_liks, optimum, num_samples, t) for t in TOLERANCES}
        main_iters = iters[MAIN_TOLERANCE]
        seconds = None if main_iters is None else main_iters * seconds_per_iter
        final_gap = (optimum - float(log_liks[-1])) / num_samples
        cells = " ".join(
            f"{('>' + str(len(log_liks) - 1)) if iters[t] is None else str(iters[t]):>13}"
            for t in TOLERANCES
        )
        seconds_cell = "-" if seconds is None else f"{seconds:.3f}"
        wall_cell = "-" if wall is None else f"{wall:.2f}"
        lines.append(
            f"{name:<20} {cells} {seconds_cell:>10} {1e3 * seconds_per_iter:>9.3f} "
            f"{compile_s:>9.2f} {wall_cell:>10} {final_gap:>13.2e}"
        )
        records.append(
            {
                "method": name,
                "lr": None if lr == "-" else float(lr),
                "iters_to": {format(t, "g"): iters[t] for t in TOLERANCES},
                "seconds_to_main_tolerance": seconds,
                "ms_per_iter": 1e3 * seconds_per_iter,
                "compile_s": compile_s,
                "run_wall_s": wall,
                "final_gap_per_point": final_gap,
                "log_likelihood_per_iter": np.asarray(log_liks).tolist(),
            }
        )

    print()
    print(
        f"N={num_samples} D={args.d} K={num_components} {args.cov} float64, "
        f"optimum log-lik {optimum:.10f} "
        f"({optimum / num_samples:.6f} per point) = jaxem EM after {args.em_iters} iterations"
    )
    print("\n".join(lines))
    print()
    print(
        "iters to tol: first t with (optimum - loglik_s) / N <= tol for all s >= t, "
        "loglik_t being the"
    )
    print("log-likelihood after t updates ('>n': not within the n recorded iterations).")
    print(f"s to {MAIN_TOLERANCE:g}: iterations x ms/iter (warm, compilation excluded).")
    print(
        f"ms/iter: best warm run of {args.timing_steps} iterations "
        "(EM: em.run with tol=0; SVI: jit(scan(svi.update)))."
    )
    print(
        "run wall s: first call of the recorded run (em.run for all EM iterations, svi.run), "
        "compilation included."
    )
    print(
        "final gap/pt: (optimum - last recorded loglik) / N; negative: ended above the 'optimum'."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "meta": {**meta, "load_average_end": os.getloadavg()},
                    "config": {**vars(args), "data_seed": DATA_SEED, "init_seed": INIT_SEED},
                    "optimum": optimum,
                    "hand_written_optimum": float(hand_log_lik),
                    "svi_final_log_likelihood": {
                        format(lr, "g"): value for lr, value in svi_finals.items()
                    },
                    "results": records,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
