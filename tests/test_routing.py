"""Difficulty estimators, the gate, capacity windows, budget pressure, the label benchmark."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from backends import GenerationRequest
from gateway.routing import CapacityTracker, create_estimator
from gateway.routing.capacity import CapacityWindow
from gateway.routing.estimators import MODEL_FILE, HeuristicEstimator, LearnedEstimator
from gateway.routing.features import RequestText, extract
from gateway.routing.tiers import RouteContext, pressure_raise, route
from gateway.routing.train import default_data_dir, routing_curve, train
from gateway.runtime import Runtime
from policies import CapacitySpec, PolicyError, RoutingSpec, TierSpec, parse_policy

pytestmark = pytest.mark.unit

EASY = "What is the capital of France?"
HARD = ("Prove step by step that the algorithm below terminates, then derive its worst-case "
        "complexity and compare it with a heap-based design. Statement 1 | every call shrinks "
        "the input. Statement 2 | the loop invariant holds after each iteration.\n"
        "```python\ndef f(xs):\n    return sorted(xs)[::2]\n```\n" + "Consider the edge cases. " * 30)


def chat(text: str, **kw) -> GenerationRequest:
    return GenerationRequest(model="auto", messages=[{"role": "user", "content": text}], **kw)


@pytest.mark.parametrize("name", ["heuristic", "learned"])
def test_estimators_score_in_unit_interval_and_rank_hard_above_easy(name):
    est = create_estimator(name)
    easy, hard = est.score(chat(EASY)), est.score(chat(HARD))
    assert 0.0 <= easy.score < hard.score <= 1.0
    assert set(easy.features) == set(extract(RequestText.of(chat(EASY))))


def test_unknown_estimator_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown difficulty estimator 'bert'.*heuristic, learned"):
        create_estimator("bert")


def test_features_see_the_last_user_turn_and_the_conversation_depth():
    req = GenerationRequest(model="auto", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "x" * 3000},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": EASY}])
    text = RequestText.of(req)
    assert text.last == EASY and text.turns == 2 and text.has_system
    assert text.context_chars == 3000 + len("be brief") + len("ok")
    features = extract(text)
    assert features["turns"] > 0 and features["context"] > 0 and features["system"] == 1.0


def test_huge_prompts_are_scanned_in_bounded_windows():
    huge = chat("How many primes are there below 10? " * 50_000)
    features = extract(RequestText.of(huge))
    assert features["length"] == 1.0  # length is measured on the whole prompt
    assert 0 <= HeuristicEstimator().score(huge).score <= 1


def test_learned_scores_keep_their_order_outside_the_training_range():
    est = LearnedEstimator.load()
    low, high = est.quantiles[0], est.quantiles[-1]
    assert 0 < est.to_score(low - 5) < est.to_score(low - 1) < est.to_score(low) <= est.TAIL
    assert 1 - est.TAIL <= est.to_score(high) < est.to_score(high + 1) < est.to_score(high + 5) < 1
    mids = [est.to_score(p) for p in est.quantiles]
    assert mids == sorted(mids)


def test_learned_fit_finds_an_interaction_and_predicts_as_it_was_fitted():
    """The strong model helps only when two features are both high: a degree-2 fit must rank
    those prompts first, and the shipped estimator's arithmetic must match the fit's."""
    np = pytest.importorskip("numpy")
    from gateway.routing.train import Example, _design, _fit_ridge, _predict, fit_artefact

    rng = random.Random(11)
    features, examples = [], []
    for i in range(600):
        a, b, c = rng.random(), rng.random(), rng.random()
        helps = a > 0.6 and b > 0.6
        features.append({"a": a, "b": b, "c": c})
        examples.append(Example(f"s{i % 5}", "", weak=not helps, strong=helps or rng.random() < 0.5))
    artefact = fit_artefact(features, examples, degree=2, alpha=1.0)
    est = LearnedEstimator(artefact)
    assert artefact["features"] == ["a", "b", "c"] and len(artefact["weights"]) == 3 + 6
    gain = np.array([float(e.strong) - float(e.weak) for e in examples])
    x = _design(features, ["a", "b", "c"], 2)
    expected = _predict(_fit_ridge(x, gain, 1.0), x)
    got = [est.predict(f) for f in features]
    assert got == pytest.approx(list(expected), abs=1e-5)
    helped = [est.to_score(p) for p, e in zip(got, examples, strict=True)
              if e.strong and not e.weak]
    others = [est.to_score(p) for p, e in zip(got, examples, strict=True) if e.weak]
    assert min(helped) > sorted(others)[len(others) // 2]  # every helped prompt above the median


def test_the_routing_data_ships_in_the_checkout(monkeypatch):
    monkeypatch.delenv("JOULEGATE_ROUTING_DATA", raising=False)
    data = default_data_dir()
    assert data == Path(__file__).resolve().parents[1] / "data" / "routing"
    assert len(list((data / "mmlu").glob("mmlu_*.csv"))) == 46
    assert (data / "mmlu" / "contaminated_prompts.jsonl").is_file()
    assert len((data / "mt_bench" / "question.jsonl").read_text().splitlines()) == 80
    assert (data / "LICENSE-RouteLLM").is_file() and (data / "LICENSE-FastChat").is_file()


def test_joulegate_routing_data_points_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("JOULEGATE_ROUTING_DATA", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"


@pytest.mark.bench
def test_router_train_rebuilds_the_shipped_artefact_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.delenv("JOULEGATE_ROUTING_DATA", raising=False)
    data = default_data_dir()
    out = tmp_path / "router_model.json"
    train(data, out)
    assert out.read_bytes() == MODEL_FILE.read_bytes()


# -- the label benchmark's metric ---------------------------------------------------------

def test_apgr_random_is_one_half_and_an_oracle_is_far_above():
    rng = random.Random(3)
    weak = [rng.random() < 0.6 for _ in range(500)]
    strong = [w or rng.random() < 0.5 for w in weak]
    assert routing_curve("random", [0.0] * 500, weak, strong).apgr == pytest.approx(0.5)
    oracle = [float(s and not w) for w, s in zip(weak, strong, strict=True)]
    curve = routing_curve("oracle", oracle, weak, strong)
    need = sum(oracle) / 500
    assert curve.apgr > 0.85 and curve.cpt50 == pytest.approx(0.5 * need)
    assert max(curve.quality) == pytest.approx(sum(strong) / 500)  # reached at `need`
    worst = routing_curve("anti", [-x for x in oracle], weak, strong)
    assert worst.apgr < 0.5


def test_apgr_by_hand():
    # weak right on 0,1; strong right on 1,2,3. Order by score: 2, 3, 0, 1.
    weak, strong = [True, True, False, False], [False, True, True, True]
    curve = routing_curve("r", [0.1, 0.0, 0.9, 0.8], weak, strong)
    assert curve.fractions == [0, 0.25, 0.5, 0.75, 1.0]
    assert curve.quality == [0.5, 0.75, 1.0, 0.75, 0.75]
    # PGR = (q - 0.5) / 0.25: 0, 1, 2, 1, 1 -> trapezoid area 0.25 * (0.5 + 1.5 + 1.5 + 1)
    assert curve.apgr == pytest.approx(1.125)
    assert curve.cpt50 == pytest.approx(0.125) and curve.cpt80 == pytest.approx(0.2)


# -- capacity ------------------------------------------------------------------------------

def test_capacity_by_requests_keeps_the_share_and_gives_it_to_the_hardest():
    window = CapacityWindow(CapacitySpec(fraction=0.125, window_s=1000))
    rng = random.Random(7)
    admitted = []
    for i in range(2000):
        score = rng.random()
        ok = window.admits(score, 1.0, now=i * 0.1)
        window.record(score, ok, 1.0, now=i * 0.1)
        if ok:
            admitted.append(score)
        assert window.fraction(now=i * 0.1) <= 0.125 + 1 / (i + 1) + 1e-9
    assert 0.09 < len(admitted) / 2000 <= 0.125
    assert min(admitted[20:]) > 0.7  # after warm-up only the hardest requests got it


def test_capacity_by_joules_bounds_the_share_of_energy():
    window = CapacityWindow(CapacitySpec(fraction=0.25, by="joules", window_s=1000))
    rng = random.Random(11)
    for i in range(1000):
        score, joules = rng.random(), rng.uniform(1, 50)
        ok = window.admits(score, joules, now=float(i))
        entry = window.record(score, ok, joules, now=float(i))
        window.settle(entry, joules * 1.1)  # measured differs from predicted
    assert 0.15 < window.fraction(now=999.0) <= 0.25 + 1e-9


def test_capacity_window_forgets_old_requests():
    window = CapacityWindow(CapacitySpec(fraction=0.5, window_s=10))
    for i in range(10):
        window.record(0.9, True, 1.0, now=float(i))
    assert window.fraction(now=9.0) == 1.0
    assert window.fraction(now=100.0) == 0.0
    assert window.quantile_threshold(now=100.0) is None


def test_a_rescored_entry_moves_the_quantile_and_is_not_counted_twice():
    """A cascade learns a request's score after routing recorded it: the new score replaces
    the old in the quantile, and asking whether that same request may use the tier counts it
    once (by requests and by joules); counted twice, each would wrongly be admitted."""
    window = CapacityWindow(CapacitySpec(fraction=0.5, window_s=1000))
    window.record(0.2, True, 1.0, now=0.0)
    window.record(0.8, False, 1.0, now=1.0)
    mine = window.record(0.0, False, 1.0, now=2.0)
    assert window.quantile_threshold(now=2.0) == 0.2
    window.rescore(mine, 0.9)
    assert window.quantile_threshold(now=2.0) == 0.8
    # 2 of 3 requests would use it: over half (2 of 4, as a fifth entry, would not be).
    assert not window.admits(0.9, 1.0, now=2.0, entry=mine)
    assert window.admits(0.9, 1.0, now=2.0)
    by_joules = CapacityWindow(CapacitySpec(fraction=0.5, by="joules", window_s=1000))
    by_joules.record(0.1, True, 10.0, now=0.0)
    by_joules.record(0.1, False, 10.0, now=1.0)
    by_joules.record(0.1, False, 10.0, now=2.0)
    own = by_joules.record(0.9, False, 10.0, now=3.0)
    # 10 J used of 30 J besides this request: 15 J more is 25 of 45, over half (its own
    # 10 J counted twice: 25 of 55).
    assert not by_joules.admits(0.9, 15.0, now=3.0, entry=own)
    assert by_joules.admits(0.9, 15.0, now=3.0)
    assert by_joules.admits(0.9, 10.0, now=3.0, entry=own)  # 20 of 40


def test_capacity_tracker_resets_a_window_when_its_settings_change():
    tracker = CapacityTracker()
    a = tracker.window("t", "big", CapacitySpec(fraction=0.5))
    assert tracker.window("t", "big", CapacitySpec(fraction=0.5)) is a
    assert tracker.window("t", "big", CapacitySpec(fraction=0.25)) is not a


# -- pressure and the gate ----------------------------------------------------------------

def test_pressure_curve_interpolates_and_is_flat_beyond_its_points():
    curve = [[0.5, 0.0], [0.1, 0.3], [0.0, 1.0]]
    assert pressure_raise(curve, None) == 0.0
    assert pressure_raise(curve, 0.9) == 0.0
    assert pressure_raise(curve, 0.3) == pytest.approx(0.15)
    assert pressure_raise(curve, 0.05) == pytest.approx(0.65)
    assert pressure_raise(curve, 0.0) == 1.0
    assert pressure_raise([], 0.0) == 0.0


TIERS = [TierSpec(name="small", backend="b", model="s", cost=1),
         TierSpec(name="mid", backend="b", model="m", cost=2),
         TierSpec(name="big", backend="b", model="g", cost=4)]


class FixedScore(HeuristicEstimator):
    def __init__(self, score: float):
        self.value = score

    def score_text(self, text):
        from gateway.routing import Difficulty
        return Difficulty(self.value, {})


def ctx(score, remaining=None, **routing):
    spec = RoutingSpec(thresholds={"mid": 0.4, "big": 0.8},
                       pressure=[[0.5, 0.0], [0.0, 0.5]], **routing)
    windows = {name: CapacityTracker().window("t", name, c)
               for name, c in (spec.capacity or {}).items()}
    return RouteContext(tuple(TIERS), TIERS[0], spec, FixedScore(score), remaining,
                        capacity=windows, joules={t.name: 1.0 for t in TIERS})


@pytest.mark.parametrize("score,tier", [(0.1, "small"), (0.4, "mid"), (0.79, "mid"), (0.95, "big")])
def test_gate_picks_the_costliest_tier_whose_threshold_the_score_reaches(score, tier):
    d = route(ctx(score), chat("x"))
    assert (d.tier.name, d.reason) == (tier, "gate")
    assert d.difficulty.score == score


def test_budget_pressure_raises_thresholds_smoothly():
    assert route(ctx(0.85, remaining=0.6), chat("x")).tier.name == "big"
    d = route(ctx(0.85, remaining=0.4), chat("x"))  # raise 0.1
    assert (d.tier.name, d.reason) == ("mid", "budget")
    d = route(ctx(0.85, remaining=0.0), chat("x"))  # raise 0.5
    assert (d.tier.name, d.reason) == ("small", "budget")


def test_capacity_demotes_to_the_next_tier_and_says_so():
    c = ctx(0.95, capacity={"big": CapacitySpec(fraction=0.25)})
    reasons = [route(c, chat("x")) for _ in range(8)]
    assert [d.tier.name for d in reasons].count("big") == 2
    assert {(d.tier.name, d.reason) for d in reasons} == {("big", "gate"), ("mid", "capacity")}


def test_max_tier_caps_the_choice():
    d = route(ctx(0.95), chat("x"), max_tier=TIERS[1])
    assert (d.tier.name, d.reason) == ("mid", "capped")
    d = route(ctx(0.5), chat("x"), max_tier=TIERS[1])
    assert (d.tier.name, d.reason) == ("mid", "gate")


def test_no_gated_tier_means_no_scoring():
    c = RouteContext(tuple(TIERS), TIERS[0], RoutingSpec(thresholds={}), FixedScore(0.99))
    d = route(c, chat("x"))
    assert (d.tier.name, d.reason, d.difficulty) == ("small", "gate", None)


@pytest.mark.parametrize("estimator", ["heuristic", "cascade"])
def test_with_no_candidate_only_a_cascade_records_the_request_in_its_capacity_windows(estimator):
    """A cascade escalates past routing's candidates, so its window on ``big`` must count a
    request routing had nothing to score for (at 0, to be rescored after the probe); another
    estimator's window keeps ranking only requests routing could move."""
    share = CapacitySpec(fraction=0.5)
    spec = RoutingSpec(estimator=estimator, capacity={"big": share})
    window = CapacityTracker().window("t", "big", share)
    c = RouteContext(tuple(TIERS), TIERS[0], spec, FixedScore(0.99), capacity={"big": window},
                     joules={t.name: 1.0 for t in TIERS})
    d = route(c, chat("x"))
    assert (d.tier.name, d.difficulty) == ("small", None)
    if estimator == "cascade":
        assert [(w, e.score, e.used) for w, e in d.entries] == [(window, 0.0, False)]
    else:
        assert d.entries == []


# -- policy --------------------------------------------------------------------------------

def base_policy(**extra) -> dict:
    policy = {"version": 1,
              "backends": {"b": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
              "tiers": [{"name": "small", "backend": "b", "model": "s", "cost": 1},
                        {"name": "big", "backend": "b", "model": "g", "cost": 2}],
              "tenants": {"t": {"keys": ["env:X"], "default_tier": "small"}}}
    policy.update(extra)
    return policy


def problems(policy: dict) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(policy, "p.yaml")
    return [f"{i.path}: {i.message}" for i in info.value.issues]


def test_routing_settings_merge_key_by_key():
    policy = parse_policy(base_policy(routing={"thresholds": {"big": 0.6}}) | {
        "tenants": {"t": {"keys": ["env:X"], "default_tier": "small",
                          "routing": {"estimator": "heuristic"}}}}, "p.yaml")
    spec = policy.tenant_routing("t")
    assert spec.estimator == "heuristic" and spec.thresholds == {"big": 0.6}
    assert spec.pressure == [[0.5, 0.0], [0.1, 0.3], [0.0, 1.0]]  # built-in default


def test_routing_mistakes_are_reported_with_their_paths():
    assert problems(base_policy(routing={"thresholds": {"big": 1.5}})) == [
        "routing.thresholds.big: Input should be less than or equal to 1 (got 1.5)"]
    found = problems(base_policy(routing={"thresholds": {"huge": 0.5},
                                          "capacity": {"bigg": {"fraction": 0.1}},
                                          "pressure": [[0.1, 0.2], [0.5, 0.0]]}))
    assert "routing.thresholds.huge: 'huge' is not a tier here; expected one of: big, small" in found
    assert any(p.startswith("routing.capacity.bigg:") for p in found)
    assert any(p.startswith("routing.pressure:") and "more remaining budget to less" in p
               for p in found)
    assert problems(base_policy(routing={"estimator": "cascade", "cascade": {"to": "bigg"}})) == [
        "routing.cascade.to: 'bigg' is not a tier here; expected one of: big, small"
        " (did you mean 'big'?)"]


def test_an_unknown_estimator_refuses_the_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("X", "k")
    policy = parse_policy(base_policy(routing={"estimator": "bert"}), "p.yaml")
    with pytest.raises(PolicyError, match=r"routing\.estimator: unknown difficulty estimator 'bert'"):
        Runtime(tmp_path / "p.yaml")._routing(policy, None)


def test_a_cascade_prior_must_be_an_estimator_that_scores_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("X", "k")
    found = problems(base_policy(routing={"estimator": "cascade",
                                          "cascade": {"prior": "cascade"}}))
    assert len(found) == 1 and found[0].startswith("routing.cascade.prior: ")
    assert "not 'cascade' itself" in found[0]
    # An unknown name is refused when the runtime builds the tenant's estimators ...
    policy = parse_policy(base_policy(routing={"estimator": "cascade",
                                               "cascade": {"prior": "bert"}}), "p.yaml")
    with pytest.raises(PolicyError, match=r"routing\.cascade\.prior: unknown difficulty "
                                          r"estimator 'bert'"):
        Runtime(tmp_path / "p.yaml")._routing(policy, None)
    # ... and named by check-policy's preflight, with what it may be instead.
    from gateway.preflight import estimators

    data = base_policy(tenants={"t": {"keys": ["env:X"], "default_tier": "small", "routing": {
        "estimator": "cascade", "cascade": {"prior": "heuristik"}}}})
    assert list(estimators(data)) == [
        ("tenants.t.routing.cascade.prior", "unknown difficulty estimator 'heuristik' for the "
         "cascade's prior; expected one of: heuristic, learned, semantic (did you mean "
         "'heuristic'?)")]
    # A known prior is built beside the tenant's estimator.
    ok = parse_policy(base_policy(routing={"estimator": "cascade",
                                           "cascade": {"prior": "heuristic"}}), "p.yaml")
    _, built = Runtime(tmp_path / "p.yaml")._routing(ok, None)
    assert sorted(built) == ["cascade", "heuristic"]


def test_a_saturated_tier_is_skipped_for_the_next_cheaper_one():
    c = dataclasses.replace(ctx(0.95), saturated=frozenset({"big"}))
    d = route(c, chat("x"))
    assert (d.tier.name, d.reason) == ("mid", "load")


def test_among_equal_cost_tiers_the_one_predicted_cheapest_is_tried_first():
    twins = [TIERS[0], TierSpec(name="moe-a", backend="a", model="a", cost=3),
             TierSpec(name="moe-b", backend="b", model="b", cost=3)]
    spec = RoutingSpec(thresholds={"moe-a": 0.5, "moe-b": 0.5})
    joules = {"small": 1.0, "moe-a": 9.0, "moe-b": 4.0}
    c = RouteContext(tuple(twins), twins[0], spec, FixedScore(0.9), joules=joules)
    assert route(c, chat("x")).tier.name == "moe-b"
    joules["moe-b"] = 12.0  # b got costlier per token than a
    assert route(c, chat("x")).tier.name == "moe-a"
