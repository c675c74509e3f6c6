"""jaxem: expectation-maximization for NumPyro models with latent variables: exact EM by
enumeration of discrete latents, MAP-EM and variational Bayes EM under priors, variational
EM, online EM, Monte Carlo EM and SAEM for continuous latents, and standard errors."""

from jaxem import init
from jaxem.bootstrap import BootstrapResult, bootstrap
from jaxem.closed_form import Cells, ClosedFormUpdate, contract_cells, register_closed_form
from jaxem.diagnostics import aic, bic, num_free_params, num_observations
from jaxem.em import EM, EMResult, EMState
from jaxem.estep import log_likelihood, map_assignment, posterior
from jaxem.exceptions import ConvergenceWarning, ModelError, NumericalWarning
from jaxem.global_sites import with_global_sites
from jaxem.impute import impute
from jaxem.mcem import MCEM
from jaxem.missing import nan_as_missing
from jaxem.monte_carlo import MCResult, MCState
from jaxem.online import OnlineEM, OnlineEMResult, OnlineEMState
from jaxem.saem import SAEM
from jaxem.uncertainty import StandardErrors, standard_errors
from jaxem.variational import VariationalEM, VEMResult, VEMState, elbo
from jaxem.vbem import VariationalBayesEM, VBResult, VBState

__version__ = "0.1.0"

__all__ = [
    "EM",
    "EMResult",
    "EMState",
    "VariationalEM",
    "VariationalBayesEM",
    "VBResult",
    "VBState",
    "MCEM",
    "MCResult",
    "MCState",
    "SAEM",
    "VEMResult",
    "VEMState",
    "Cells",
    "ClosedFormUpdate",
    "ConvergenceWarning",
    "ModelError",
    "NumericalWarning",
    "OnlineEM",
    "OnlineEMResult",
    "OnlineEMState",
    "aic",
    "bic",
    "contract_cells",
    "elbo",
    "impute",
    "log_likelihood",
    "map_assignment",
    "nan_as_missing",
    "num_free_params",
    "num_observations",
    "init",
    "posterior",
    "register_closed_form",
    "with_global_sites",
    "BootstrapResult",
    "bootstrap",
    "StandardErrors",
    "standard_errors",
]
