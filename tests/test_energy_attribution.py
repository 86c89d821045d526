"""Attribution on scripted meter readings: the split and the invariant."""

from __future__ import annotations

import random

import pytest

from backends import Usage
from gateway.energy import Calibration, Meter, Reading
from gateway.energy.attribution import Attribution, EnergyDevice
from gateway.energy.estimated import TokenPriceMeter

pytestmark = pytest.mark.unit


class ScriptedMeter(Meter):
    """Readings set by the test: the meter boundary, scripted."""

    kind = "scripted"

    def __init__(self) -> None:
        self.joules = 0.0

    def read(self) -> Reading:
        return Reading(self.joules, {"dev0": 100.0})


#: The weights of the backend whose requests these tests open: a prefill token counts half.
W = Attribution(prompt_weight=0.5)


def device(**kw) -> tuple[EnergyDevice, ScriptedMeter]:
    meter = ScriptedMeter()
    dev = EnergyDevice("d", meter, **kw)
    dev.start()
    return dev, meter


def test_overlapping_requests_split_by_work():
    dev, meter = device()
    a, b = Usage(), Usage()
    share_a = dev.open(a, weights=W)
    meter.joules = 10  # only A active: all 10 J to A
    a.prompt_tokens, a.completion_tokens = 20, 5  # work 20*0.5 + 5 = 15
    dev.tick()
    share_b = dev.open(b, weights=W)  # B opens: the tick at its start charges the interval to A
    a.completion_tokens += 10  # A: work 10
    b.prompt_tokens, b.completion_tokens = 40, 10  # B: work 40*0.5 + 10 = 30
    meter.joules = 50  # 40 J to split 10:30
    dev.tick()
    assert share_a.joules == pytest.approx(10 + 10)
    assert share_b.joules == pytest.approx(30)
    meter.joules = 56  # no work in this interval: equal split between the two
    assert dev.close_share(share_a) == pytest.approx(23)
    meter.joules = 60  # A gone: B alone
    b.completion_tokens += 1
    assert dev.close_share(share_b) == pytest.approx(37)
    assert dev.close_share(share_b) == pytest.approx(37)  # idempotent
    meter.joules = 65  # nobody active: idle
    dev.tick()
    assert dev.totals.idle_j == pytest.approx(5)
    assert dev.check_invariant() == pytest.approx(0, abs=1e-9)


def test_idle_before_a_request_is_not_charged_to_it():
    dev, meter = device()
    meter.joules = 100  # idle since start, never ticked
    usage = Usage()
    share = dev.open(usage, weights=W)
    usage.completion_tokens = 3
    meter.joules = 104
    assert dev.close_share(share) == pytest.approx(4)
    assert dev.totals.idle_j == pytest.approx(100)


def test_spread_idle_moves_idle_into_the_next_requests():
    dev, meter = device()
    meter.joules = 8
    dev.tick()
    usage = Usage()
    share = dev.open(usage, weights=Attribution(0.5, spread_idle=True))
    usage.completion_tokens = 1
    meter.joules = 10
    assert dev.close_share(share) == pytest.approx(10)  # 2 J own + 8 J idle overhead
    assert dev.totals.idle_j == pytest.approx(8) and dev.totals.idle_spread_j == pytest.approx(8)
    assert dev.check_invariant() == pytest.approx(0, abs=1e-9)


def test_idle_is_spread_only_over_requests_of_backends_that_ask_for_it():
    dev, meter = device()
    meter.joules = 6  # idle
    spreading, plain = Usage(), Usage()
    s_spread = dev.open(spreading, weights=Attribution(0.5, spread_idle=True))
    s_plain = dev.open(plain, weights=W)
    spreading.completion_tokens = plain.completion_tokens = 5
    meter.joules = 16  # 10 J of work, split 5:5; the 6 J idle go to the spreading one only
    dev.tick()
    assert (s_spread.joules, s_plain.joules) == (pytest.approx(5 + 6), pytest.approx(5))
    assert dev.close_share(s_spread) == pytest.approx(11)
    assert dev.close_share(s_plain) == pytest.approx(5)
    meter.joules = 20  # 4 J idle, then an interval with work by the plain backend only
    again = Usage()
    s_again = dev.open(again, weights=W)
    again.completion_tokens = 1
    meter.joules = 21
    assert dev.close_share(s_again) == pytest.approx(1)  # its backend does not take idle
    assert dev.totals.idle_j == pytest.approx(10) and dev.totals.idle_spread_j == pytest.approx(6)
    assert dev.check_invariant() == pytest.approx(0, abs=1e-9)


def test_tier_scale_weights_work():
    dev, meter = device()
    small, big = Usage(), Usage()
    s_small, s_big = dev.open(small, 1.0, W), dev.open(big, 3.0, W)
    small.completion_tokens = big.completion_tokens = 10
    meter.joules = 40
    dev.tick()
    assert (s_small.joules, s_big.joules) == (pytest.approx(10), pytest.approx(30))


def test_invariant_holds_under_random_concurrency():
    rng = random.Random(7)
    dev, meter = device()
    open_shares: list[tuple[Usage, object]] = []
    closed_total = 0.0
    for _ in range(2000):
        action = rng.random()
        if action < 0.2:
            usage = Usage()
            open_shares.append((usage, dev.open(usage, rng.choice([1.0, 1.7]), W)))
        elif action < 0.35 and open_shares:
            _, share = open_shares.pop(rng.randrange(len(open_shares)))
            closed_total += dev.close_share(share)
        else:
            for usage, _ in open_shares:
                if rng.random() < 0.7:
                    usage.completion_tokens += rng.randint(0, 3)
                    usage.prompt_tokens += rng.choice([0, 0, 0, rng.randint(1, 200)])
            meter.joules += rng.uniform(0, 5)
            if rng.random() < 0.5:
                dev.tick()
    for _, share in open_shares:
        closed_total += dev.close_share(share)
    meter.joules += 1.0
    dev.tick()
    assert closed_total + dev.totals.idle_j == pytest.approx(meter.joules, rel=1e-9)
    assert dev.check_invariant() < 1e-6


def test_token_price_device_charges_exactly_the_price():
    dev = EnergyDevice("up", TokenPriceMeter())
    dev.start()
    price = Attribution(prompt_weight=0.01, output_weight=0.2)  # the backend's prices
    a, b = Usage(), Usage()
    sa, sb = dev.open(a, weights=price), dev.open(b, weights=price)
    a.prompt_tokens, a.completion_tokens = 100, 10
    b.prompt_tokens, b.completion_tokens = 10, 50
    assert dev.close_share(sa) == pytest.approx(100 * 0.01 + 10 * 0.2)
    assert dev.close_share(sb) == pytest.approx(10 * 0.01 + 50 * 0.2)
    assert dev.source == "estimated"


def test_a_token_price_is_the_backends_so_a_repriced_request_keeps_its_own():
    dev = EnergyDevice("up", TokenPriceMeter())
    dev.start()
    old, new = Usage(), Usage()
    s_old = dev.open(old, weights=Attribution(0.01, 0.2))  # in flight across a reload
    s_new = dev.open(new, weights=Attribution(0.02, 0.5))  # opened under the new prices
    old.prompt_tokens, old.completion_tokens = 100, 10
    new.prompt_tokens, new.completion_tokens = 100, 10
    assert dev.close_share(s_old) == pytest.approx(100 * 0.01 + 10 * 0.2)
    assert dev.close_share(s_new) == pytest.approx(100 * 0.02 + 10 * 0.5)
    assert dev.meter.read().joules == pytest.approx(3.0 + 7.0)


def test_calibration_learns_and_persists(tmp_path):
    path = tmp_path / "cal.json"
    cal = Calibration(path)
    cal.seed("small", 0.01, 0.5)
    assert cal.per_token("small") == pytest.approx((0.01, 0.5))
    rng = random.Random(3)
    for _ in range(400):
        p, o = rng.randint(10, 400), rng.randint(1, 200)
        cal.update("small", p, o, 0.03 * p + 1.2 * o)
    a, b = cal.per_token("small")
    assert a == pytest.approx(0.03, rel=0.1) and b == pytest.approx(1.2, rel=0.01)
    assert cal.predict("small", 100, 50) == pytest.approx(0.03 * 100 + 1.2 * 50, rel=0.03)
    cal.save()
    again = Calibration(path)
    again.seed("small", 0.01, 0.5)  # seeds update, learning is kept
    assert again.per_token("small") == pytest.approx((a, b))
    path.write_text("{broken")
    assert Calibration(path).per_token("small") == (0.0, 0.0)


def test_a_shared_device_charges_only_the_gateways_share_of_its_work():
    dev, meter = device()
    own = {"fraction": 1.0}
    dev.own_fraction = lambda: own["fraction"]
    a = Usage()
    share = dev.open(a, weights=W)
    a.completion_tokens = 10
    meter.joules = 100  # the server did only our work: all ours
    dev.tick()
    own["fraction"] = 0.25  # other clients did three quarters of the server's tokens
    a.completion_tokens = 20
    meter.joules = 200
    dev.tick()
    own["fraction"] = 7.0  # a lumpy counter reading never charges more than the delta
    meter.joules = 220
    assert dev.close_share(share) == pytest.approx(100 + 25 + 20)
    assert dev.totals.foreign_j == pytest.approx(75)
    assert dev.check_invariant() == pytest.approx(0, abs=1e-9)
