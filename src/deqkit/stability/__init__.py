"""Stability of deep equilibrium cells: weight parametrizations, Jacobian diagnostics,
regularisers and the one-call stability report.

This package imports only the core (the driver, solvers, linear solvers and adjoints), never
the layer modules it stabilises: ``deqkit.nn`` imports it, not the other way round.
"""

from .diagnostics import jacobian_spectral_norm as jacobian_spectral_norm
from .diagnostics import jacobian_spectral_radius as jacobian_spectral_radius
from .lipschitz import lipschitz_upper_bound as lipschitz_upper_bound
from .parametrizations import cached_parametrizations as cached_parametrizations
from .parametrizations import scale_to_contractive as scale_to_contractive
from .parametrizations import spectral_norm as spectral_norm
from .parametrizations import weight_norm as weight_norm
from .regularisers import fixed_point_correction_loss as fixed_point_correction_loss
from .regularisers import jacobian_frobenius_reg as jacobian_frobenius_reg
from .report import DEQLike as DEQLike
from .report import StabilityReport as StabilityReport
from .report import stability_report as stability_report
