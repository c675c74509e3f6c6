"""jaxem: expectation-maximization for NumPyro models with discrete latent variables."""

from jaxem.closed_form import Cells, ClosedFormUpdate, contract_cells, register_closed_form
from jaxem.diagnostics import aic, bic, num_free_params, num_observations
from jaxem.em import EM, EMResult, EMState
from jaxem.estep import log_likelihood, map_assignment, posterior
from jaxem.tracing import ModelError
from jaxem.variational import VariationalEM, VEMResult, VEMState, elbo

__version__ = "0.1.0"

__all__ = [
    "EM",
    "EMResult",
    "EMState",
    "VariationalEM",
    "VEMResult",
    "VEMState",
    "Cells",
    "ClosedFormUpdate",
    "ModelError",
    "aic",
    "bic",
    "contract_cells",
    "elbo",
    "log_likelihood",
    "map_assignment",
    "num_free_params",
    "num_observations",
    "posterior",
    "register_closed_form",
]
