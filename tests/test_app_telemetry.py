"""FastAPI's built-in OpenTelemetry is switched on only for what the process configured: an
unconfigured process does not pay for three provider look-ups on every request, and one run
under an OpenTelemetry SDK (or told to let FastAPI configure it) keeps its telemetry."""

from __future__ import annotations

import pytest
from opentelemetry import _logs, metrics, trace

from gateway.app import otel_telemetry

pytestmark = pytest.mark.unit


def test_unconfigured_providers_switch_everything_off():
    assert otel_telemetry(environ={}) == {"tracing": False, "metrics": False, "logs": False}


def test_each_configured_provider_keeps_its_own_telemetry():
    unset = (trace.get_tracer_provider(), metrics.get_meter_provider(),
             _logs.get_logger_provider())
    tracer_only = (trace.NoOpTracerProvider(), unset[1], unset[2])
    assert otel_telemetry(tracer_only, environ={}) == {
        "tracing": True, "metrics": False, "logs": False}
    everything = (trace.NoOpTracerProvider(), metrics.NoOpMeterProvider(),
                  _logs.NoOpLoggerProvider())
    assert otel_telemetry(everything, environ={}) == {
        "tracing": True, "metrics": True, "logs": True}


def test_auto_configuration_is_left_to_fastapi():
    assert otel_telemetry(environ={"FASTAPI_OTEL_AUTO_CONFIGURE": "True"}) == {}
