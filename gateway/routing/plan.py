"""One request's tier plan: where it runs, where it may move, and why it moved.

Routing decides the first tier once (:func:`~.tiers.pick_tier`); :meth:`TierPlan.build`
then lays out, once, the tiers the request may move to: cheaper tiers of the degrade ladder
when its budget cannot pay for the first (the budget guard calls :meth:`TierPlan.degrade`),
and the fallback ladder when a tier fails before answering (the pipeline calls
:meth:`TierPlan.fall_back`). Everything that reports the tier — capacity windows, metrics,
headers, the access log, ``usage`` — reads :attr:`TierPlan.tier`, the tier that served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from policies import RoutingSpec, TenantSpec, TierSpec

from .tiers import Decision, RouteContext, Skip


@dataclass(frozen=True, slots=True)
class Candidate:
    tier: TierSpec
    #: A budget that cannot pay for the first tier may move the request here.
    degrade: bool = False
    #: A tier that failed before answering may hand the request on to this one.
    fallback: bool = False


def degrade_ladder(spec: TenantSpec, tiers: Sequence[TierSpec]) -> tuple[str, ...] | None:
    """The tiers a tenant's budget may degrade a request to (``tiers``: the tenant's), or
    None when it rejects instead."""
    if spec.on_exhausted != "degrade":
        return None
    return tuple(spec.degrade_ladder or [t.name for t in tiers])


@dataclass(eq=False, slots=True)
class TierPlan:
    decision: Decision
    #: The routed tier first, then the tiers the request may move to, in fallback order.
    candidates: list[Candidate]
    #: Tiers passed over, in order, and why (routing's skips first).
    skipped: list[Skip] = field(default_factory=list)
    #: Tiers whose backend was called, in order; the last one is serving.
    attempts: list[TierSpec] = field(default_factory=list)
    #: The route reason of the serving tier: routing's, ``budget`` after a degrade,
    #: ``fallback`` after a failure.
    reason: str = ""
    degraded_from: str | None = None
    #: ``estimator: cascade``: the probe's confidence in the first tier's answer (None: no
    #: probe ran), and that tier when the request escalated from it.
    confidence: float | None = None
    escalated_from: str | None = None
    #: ``estimator: cascade``: the tier an escalation was due to, held back by its capacity.
    held: str | None = None
    _at: int = 0

    @classmethod
    def build(cls, decision: Decision, tiers: Sequence[TierSpec], routing: RoutingSpec,
              degrade_to: tuple[str, ...] | None) -> TierPlan:
        """The plan for ``decision`` among a tenant's ``tiers`` (cheapest first)."""
        first = decision.tier
        allowed = {t.name: t for t in tiers}
        mode = routing.fallback or "off"
        ladder: list[str] = []
        if mode == "all" or (mode == "auto" and decision.reason != "pinned"):
            ladder = routing.fallback_ladder or [t.name for t in reversed(tiers)]
            if first.name in ladder:
                ladder = ladder[ladder.index(first.name) + 1:]
        cheaper = [t.name for t in reversed(tiers) if t.cost < first.cost
                   and degrade_to is not None and t.name in degrade_to]
        candidates = [Candidate(first)] + [
            Candidate(allowed[n], n in cheaper, n in ladder)
            for n in dict.fromkeys(ladder + cheaper) if n in allowed and n != first.name]
        return cls(decision, candidates, list(decision.skipped), reason=decision.reason)

    @classmethod
    def route(cls, ctx: RouteContext, decision: Decision) -> TierPlan:
        return cls.build(decision, ctx.tiers, ctx.routing, ctx.degrade_ladder)

    @property
    def tier(self) -> TierSpec:
        """The tier in force: the one serving (or last tried)."""
        return self.candidates[self._at].tier

    @property
    def fallen_back(self) -> list[str]:
        """The tiers that failed before answering, in the order they were tried (a cascade's
        probed tier, escalated from, did not fail)."""
        return [t.name for t in self.attempts[:-1] if t.name != self.escalated_from]

    def degrade_options(self) -> list[TierSpec]:
        """Cheaper tiers a budget may move the request to, most capable first."""
        if self._at != 0:
            return []
        return sorted((c.tier for c in self.candidates[1:] if c.degrade), key=lambda t: -t.cost)

    def degrade(self, tier: TierSpec) -> None:
        """The budget cannot pay for the tier in force: run on ``tier`` instead."""
        self.degraded_from = self.tier.name
        self._move(next(i for i, c in enumerate(self.candidates) if c.tier is tier), "budget")

    def attempt(self) -> TierSpec:
        """The tier in force is about to be called."""
        self.attempts.append(self.tier)
        return self.tier

    def fall_back(self, error: str) -> TierSpec | None:
        """The tier in force failed before answering: the next tier of the ladder not yet
        tried, now in force, or None (the plan stays on the failed tier)."""
        tried = {t.name for t in self.attempts}
        current = self.candidates[self._at]
        start = self._at + 1 if current.fallback or self._at == 0 else 1
        for i in range(start, len(self.candidates)):
            c = self.candidates[i]
            if c.fallback and c.tier.name not in tried:
                self._move(i, "fallback", f"failed: {error}")
                return c.tier
        return None

    def rescore(self, score: float) -> None:
        """The request's score, known only now (``estimator: cascade``: 1 - the probe's
        confidence), replaces routing's in the capacity windows."""
        for window, entry in self.decision.entries:
            window.rescore(entry, score)

    def may_escalate(self, tier: TierSpec, joules: float) -> bool:
        """Whether ``tier``'s capacity window (if it has one) admits this request, at its
        score and ``joules`` predicted there, beside the requests it already holds."""
        for window, entry in self.decision.entries:
            if window.tier == tier.name:
                return window.admits(entry.score, joules, entry=entry)
        return True

    def hold(self, tier: TierSpec) -> None:
        """An escalation to ``tier`` its capacity window did not admit (``estimator:
        cascade``): the tier in force answers after all."""
        self.held = tier.name
        self.skipped.append(Skip(tier.name, "capacity"))

    def escalate(self, tier: TierSpec, confidence: float) -> None:
        """The tier in force answered with too little ``confidence`` (``estimator:
        cascade``): run on the costlier ``tier`` instead."""
        self.escalated_from = self.tier.name
        index = next((i for i, c in enumerate(self.candidates) if c.tier.name == tier.name), None)
        if index is None:
            self.candidates.append(Candidate(tier))
            index = len(self.candidates) - 1
        self._move(index, "cascade", f"cascade: confidence {confidence:.3f}")

    def _move(self, index: int, reason: str, why: str | None = None) -> None:
        self.skipped.append(Skip(self.tier.name, why or reason))
        self._at, self.reason = index, reason
        serving = self.tier.name
        for window, entry in self.decision.entries:  # capacity counts the serving tier
            window.reassign(entry, used=window.tier == serving)

    def settle(self, joules: float) -> None:
        """The request's measured joules replace the capacity windows' prediction."""
        for window, entry in self.decision.entries:
            window.settle(entry, joules)
