"""Energy accounting: meters (one small class per kind), attribution, calibration.

See ``docs/energy.md`` for the method and its error sources.
"""

from .accounting import BackendEnergy, EnergyAccounting, EnergySettingsError
from .attribution import Attribution, EnergyDevice, RequestEnergy
from .calibration import Calibration
from .meter import Meter, MeterUnavailable, Reading

__all__ = ["Attribution", "BackendEnergy", "Calibration", "EnergyAccounting", "EnergyDevice",
           "EnergySettingsError", "Meter", "MeterUnavailable", "Reading", "RequestEnergy"]
