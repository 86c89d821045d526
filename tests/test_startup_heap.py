"""A served gateway freezes what its start-up made (``gc.freeze``), so the cyclic collector's
full collections stop walking the modules, policy, estimators and models on every pass; an
app made in-process (tests, embedding the gateway) leaves the collector as it is."""

from __future__ import annotations

import gc

import pytest

from gateway.app import create_app

from .inprocess import InProcessGateway

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


async def test_a_served_app_freezes_its_start_up_heap_and_an_in_process_one_does_not(tmp_path):
    assert gc.get_freeze_count() == 0
    try:
        (tmp_path / "plain").mkdir()
        async with InProcessGateway(tmp_path / "plain") as gw:
            assert (await gw.chat(content="hi", max_tokens=4)).status_code == 200
            assert gc.get_freeze_count() == 0

        (tmp_path / "served").mkdir()
        served = InProcessGateway(tmp_path / "served")
        served.app = create_app(served.policy_path, build_backend=served._build,
                                freeze_startup_heap=True)
        async with served:
            assert gc.get_freeze_count() > 0
            assert (await served.chat(content="hi", max_tokens=4)).status_code == 200
    finally:
        gc.unfreeze()
