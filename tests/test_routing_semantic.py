"""The semantic estimator, its explanation, `router eval --labels` and the LODO splits."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest

from backends import GenerationRequest
from gateway.cli import main
from gateway.routing import create_estimator
from gateway.routing.estimators import SemanticEstimator
from gateway.routing.labels import Example, read_label_file, request_for
from gateway.runtime import Runtime
from policies import PolicyError, parse_policy

pytestmark = pytest.mark.unit

pytest.importorskip("numpy")
pytest.importorskip("wordllama")

EASY = "What is the capital of France?"
HARD = ("Prove step by step that the algorithm below terminates, then derive its worst-case "
        "complexity.\n```python\ndef f(xs):\n    return sorted(xs)[::2]\n```\n"
        + "Consider the edge cases. " * 30)


def chat(text: str) -> GenerationRequest:
    return GenerationRequest(model="auto", messages=[{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def semantic() -> SemanticEstimator:
    est = create_estimator("semantic")
    assert isinstance(est, SemanticEstimator)
    return est


def test_semantic_loads_from_the_package_and_scores(semantic):
    easy, hard = semantic.score(chat(EASY)), semantic.score(chat(HARD))
    assert 0.0 < easy.score < hard.score < 1.0
    assert semantic.score(chat(EASY)) == easy  # deterministic
    completion = semantic.score(GenerationRequest(model="auto", prompt="def f(x):\n    \"\"\"Sum.\"\"\"\n"))
    assert 0.0 < completion.score < 1.0
    assert semantic.score(chat("")).score >= 0.0  # no tokens: still a score


def test_explanation_returns_the_nearest_labelled_prompts(semantic):
    neighbours = semantic.explain(chat("Write a Python function that reverses a linked list."), 4)
    assert len(neighbours) == 4
    sims = [n.similarity for n in neighbours]
    assert sims == sorted(sims, reverse=True) and sims[0] > 0.3
    assert all(n.source in semantic.model.sources and n.excerpt for n in neighbours)
    assert all(isinstance(n.cheap_ok, bool) and isinstance(n.strong_ok, bool) for n in neighbours)


def test_route_json_carries_the_neighbours(capsys):
    assert main(["route", "--estimator", "semantic", "--json", "--neighbours", "3",
                 "Write a Python function that merges two sorted lists."]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimator"] == "semantic" and len(out["neighbours"]) == 3
    assert set(out["neighbours"][0]) == {"similarity", "source", "excerpt", "cheap_ok", "strong_ok"}
    assert main(["route", "--estimator", "semantic", "What is 2 + 2?"]) == 0
    assert "nearest labelled prompts" in capsys.readouterr().out


def test_without_wordllama_a_policy_naming_semantic_is_refused_at_load(tmp_path, monkeypatch):
    from tests.test_routing import base_policy

    monkeypatch.setitem(sys.modules, "wordllama", None)  # as if the package were absent
    monkeypatch.setenv("X", "k")
    policy = parse_policy(base_policy(routing={"estimator": "semantic"}), "p.yaml")
    with pytest.raises(PolicyError, match=r"routing\.estimator: .*'semantic' needs the wordllama "
                                          r"package.*joulegate\[models\]"):
        Runtime(tmp_path / "p.yaml")._routing(policy, None)


def _write(path, rows):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "cheap_ok", "strong_ok"])
        w.writerows(rows)


def test_router_eval_labels_scores_every_shipped_estimator_in_file_order(tmp_path, capsys):
    rows = [(EASY, 1, 1), (HARD, 0, 1), ("Name a primary colour.", 1, 1),
            ("Implement a B-tree with deletion in C and prove its invariants.", 0, 1),
            ("Who wrote Hamlet?", 1, 0), ("Solve x^2 - 5x + 6 = 0 step by step.", 0, 0)]
    path = tmp_path / "mine.csv"
    _write(path, rows)
    assert main(["router", "eval", "--labels", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == len(rows) and "nothing is fitted" in out["note"]
    low, high = out["random_apgr_middle_95pct"]
    assert low < 0.5 < high
    assert {"heuristic", "learned", "semantic"} <= set(out["estimators"])
    for name in ("heuristic", "learned", "semantic"):
        result = out["estimators"][name]
        est = create_estimator(name)
        expected = [est.score(chat(prompt)).score for prompt, _, _ in rows]
        assert result["scores"] == pytest.approx(expected, abs=1e-6)  # file order
        assert -1.0 < result["apgr"] < 3.0
        assert 0.0 < result["p_vs_chance"] <= 1.0
    assert main(["router", "eval", "--labels", str(path)]) == 0
    text = capsys.readouterr().out
    assert "| semantic |" in text and "nothing is fitted" in text
    assert "| p vs chance |" in text and "random routing's APGR here" in text


#: Four prompts with the cheap answer's log-probabilities: the unsure ones are the ones it
#: got wrong (rows 1 and 3, which only the strong tier gets right).
PROBED = [(EASY, 1, 1, "-0.01 -0.02"), (HARD, 0, 1, "-0.01 -2.5"),
          ("Name a primary colour.", 1, 1, "-0.05 -0.01"), ("Who wrote Hamlet?", 0, 1, "-1.5 -1.0")]


def _probed(tmp_path):
    path = tmp_path / "probed.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "cheap_ok", "strong_ok", "cheap_logprobs"])
        w.writerows(PROBED)
    return PROBED, path


def test_router_eval_labels_ranks_by_the_cascade_where_the_file_has_log_probabilities(
        tmp_path, capsys):
    rows, path = _probed(tmp_path)
    assert main(["router", "eval", "--labels", str(path), "--json"]) == 0
    cascade = json.loads(capsys.readouterr().out)["estimators"]["cascade"]
    # 1 - exp(mean log-probability) of the default probe (8 tokens, mean), in file order
    assert cascade["scores"] == pytest.approx(
        [1 - math.exp(sum(map(float, lp.split())) / 2) for *_, lp in rows], abs=1e-5)
    assert cascade["apgr"] == pytest.approx(0.75)  # the oracle order: the two wrong rank first
    # A random order ranks those two first one time in six (2 of 4 positions: 1 / C(4, 2)).
    assert cascade["p_vs_chance"] == pytest.approx(1 / 6, abs=0.03)
    # Without the column the cascade has nothing to rank by and is not listed.
    _write(path, [r[:3] for r in rows])
    assert main(["router", "eval", "--labels", str(path), "--json"]) == 0
    assert "cascade" not in json.loads(capsys.readouterr().out)["estimators"]


def test_a_cascade_cell_gives_no_one_shot_joules():
    from gateway.routing.lodo import cell

    examples = [Example("t", f"p{i}", w, s, "t", "bare", 1.0, 3.0, (-0.1,))
                for i, (w, s) in enumerate([(1, 1), (0, 1), (0, 0), (1, 1)])]
    c = cell("t", "native", "cascade", [0.1, 0.9, 0.5, 0.2], examples, priced=False)
    assert c.apgr == pytest.approx(0.875)  # as priced: the ranking is the same
    assert (c.joules95, c.margin, c.curve) == (None, None, ([], []))


def test_router_eval_labels_refuses_a_file_without_the_columns(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("question,label\nx,1\n")
    assert main(["router", "eval", "--labels", str(path)]) == 2
    assert "missing column(s) cheap_ok, prompt, strong_ok" in capsys.readouterr().err


def test_apgr_cost_and_margin_by_hand():
    """4 prompts; only the second needs the strong tier. Cheap 0.5, strong 0.75. The score
    order sends it first: quality 0.5, 0.75, 0.75, 0.75, 0.75 at strong share 0..1, so PGR
    0, 1, 1, 1, 1 and APGR = 0.125 + 3 * 0.25 = 0.875. 95% of strong (0.7125) is reached at
    share 0.2125. Joules: cheap 1 J, strong 3 J each (always-strong 12 J): 4/12 at share 0,
    6/12 at the first step, so 95% at (4 + 2 * 0.85) / 12 = 0.475; random at equal joules is
    the line from (1/3, 0.5) to (1, 0.75), whose least gap below the curve is at 10/12:
    0.75 - 0.6875 = 0.0625."""
    from gateway.routing.lodo import cell

    examples = [Example("t", f"p{i}", w, s, "t", "bare", 1.0, 3.0)
                for i, (w, s) in enumerate([(1, 1), (0, 1), (0, 0), (1, 1)])]
    c = cell("t", "native", "x", [0.1, 0.9, 0.5, 0.2], examples)
    assert c.apgr == pytest.approx(0.875)
    assert c.fraction95 == pytest.approx(0.2125)
    assert c.joules95 == pytest.approx(0.475)
    assert c.margin == pytest.approx(0.0625)
    flat = cell("t", "native", "random", [0.0] * 4, examples)
    assert flat.apgr == pytest.approx(0.5) and flat.margin == pytest.approx(0.0)


def _synthetic(n_per_source: int = 40) -> list[Example]:
    out = []
    for source, topic in (("alpha", "Explain the history of"), ("beta", "Compute the sum of"),
                          ("gamma", "Write a function that sorts")):
        for i in range(n_per_source):
            hard = i % 3 == 0
            prompt = f"{topic} item {i}" + (" step by step, then prove it." * 3 if hard else ".")
            out.append(Example(f"{source}-file", prompt, not hard, True, source))
    return out


def test_lodo_splits_never_put_the_held_out_source_in_training(semantic):
    from gateway.routing import semantic_train
    from gateway.routing.lodo import split

    examples = _synthetic()
    # A source may ask another source's prompts of other tiers: those prompts stay out too.
    shared = Example("copy", examples[0].prompt, True, True, "delta")
    train_rows, test_rows = split([*examples, shared], "delta")
    assert test_rows == [len(examples)] and 0 not in train_rows
    assert len(train_rows) == len(examples) - 1
    inputs = semantic_train.prepare(examples, semantic.model.embedder)
    for held in ("alpha", "beta", "gamma"):
        train_rows, test_rows = split(examples, held)
        assert {examples[r].source for r in test_rows} == {held}
        assert held not in {examples[r].source for r in train_rows}
        assert sorted(train_rows + test_rows) == list(range(len(examples)))
        # Model selection inside training leaves one *training* source out at a time.
        folds = semantic_train.groups(examples, train_rows)
        assert [{examples[r].source for r in f} for f in folds] == \
            [{s} for s in sorted({"alpha", "beta", "gamma"} - {held})]
        model, _ = semantic_train.fit(inputs, examples, train_rows, embedder=semantic.model.embedder)
        assert held not in model.sources and held not in model.meta["sources"]
        assert model.meta["examples"] == len(train_rows)
        stored = {" ".join(e.split()) for e in model.excerpts}
        assert not stored & {" ".join(examples[r].prompt.split()) for r in test_rows}


def test_label_files_and_wordings(tmp_path):
    path = tmp_path / "x.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "cheap_ok", "strong_ok", "cheap_joules", "strong_joules", "format"])
        w.writerow(['def f(x):\n    """Double x."""\n', "True", "0", "1.5", "4", "completion"])
    (e,) = read_label_file(path)
    assert (e.weak, e.strong, e.weak_joules, e.strong_joules, e.format, e.kind) == \
        (True, False, 1.5, 4.0, "completion", "code")
    assert request_for(e).prompt == e.prompt and request_for(e).messages is None
    chat_request = request_for(e, "chat").messages
    assert chat_request is not None and "```python" in chat_request[0]["content"]
    system = request_for(e, "system").messages
    assert system is not None and [m["role"] for m in system] == ["system", "user"]
    fewshot = request_for(e, "fewshot").messages
    assert fewshot is not None and fewshot[0]["content"].endswith(e.prompt)


def test_prompt_scores_attach_to_the_labelled_prompts_they_name(tmp_path):
    """``data/routing/prompt-scores-small.csv`` (benchmarks/prompt_scores.py) gives prompts the
    cheap tier's mean log-probability of their text, by source, format and text; the
    leave-one-dataset-out row ``cascade-prompt`` ranks the least likely first."""
    from gateway.routing.labels import PROMPT_SCORES, load_sources
    from gateway.routing.lodo import prompt_scores

    folder = tmp_path / "alpha"
    folder.mkdir()
    with (folder / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "cheap_ok", "strong_ok", "format"])
        w.writerows([["What is 2 + 2?", 1, 1, "chat"], ["Quelle heure est-il?", 0, 1, "chat"],
                     ["What is 2 + 2?", 1, 1, "bare"]])
    plain = load_sources(tmp_path)["alpha"]
    assert [e.prompt_logprob for e in plain] == [None, None, None]
    with (tmp_path / PROMPT_SCORES).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "mean_logprob"])
        w.writerows([[plain[1].key, "-2.5"], [plain[0].key, "-0.5"]])
    scored = load_sources(tmp_path)["alpha"]
    # The same text asked in another format is another labelled prompt: not scored.
    assert [e.prompt_logprob for e in scored] == [-0.5, -2.5, None]
    unfamiliar = prompt_scores(scored[:2])
    assert unfamiliar == pytest.approx([1 - math.exp(-0.5), 1 - math.exp(-2.5)])
    assert unfamiliar[1] > unfamiliar[0]


def test_prompt_scores_in_other_wordings_give_the_prompt_signal_a_wording_spread(tmp_path):
    """``prompt-scores-small-wordings.csv`` (``prompt_scores.py --wordings``): a prompt's
    score asked in another wording; ``router eval`` gives the prompt signal a cell in each
    wording with at least MIN_PROMPTS scored prompts, ranked by those scores."""
    from gateway.routing.estimators import HeuristicEstimator
    from gateway.routing.labels import MIN_PROMPTS, PROMPT_SCORES, WORDED_SCORES, load_sources
    from gateway.routing.lodo import worded_prompt_cells

    folder = tmp_path / "alpha"
    folder.mkdir()
    n = MIN_PROMPTS
    hard = [i % 3 == 0 for i in range(n)]  # the strong tier alone answers these
    with (folder / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "cheap_ok", "strong_ok"])
        w.writerows([[f"question {i}", int(not h), 1] for i, h in enumerate(hard)])
    rows = load_sources(tmp_path)["alpha"]
    with (tmp_path / PROMPT_SCORES).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "mean_logprob"])
        w.writerows([[e.key, "-1.0"] for e in rows])  # as labelled: no signal at all
    with (tmp_path / WORDED_SCORES).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "wording", "mean_logprob"])
        # In the system wording the hard ones read as unfamiliar; in fewshot, the easy ones;
        # chat was scored for too few prompts to make a cell.
        pairs = list(zip(rows, hard, strict=True))
        w.writerows([[e.key, "system", "-3.0" if h else "-0.5"] for e, h in pairs])
        w.writerows([[e.key, "fewshot", "-0.5" if h else "-3.0"] for e, h in pairs])
        w.writerows([[e.key, "chat", "-1.0"] for e in rows[:n - 1]])
    scored = load_sources(tmp_path)["alpha"]
    assert scored[0].prompt_logprob_in("native") == scored[0].prompt_logprob_in("bare") == -1.0
    assert scored[0].prompt_logprob_in("system") == -3.0
    assert scored[0].prompt_logprob_in("completion") is None
    assert scored[-1].prompt_logprob_in("chat") is None
    cells = worded_prompt_cells("alpha", scored, HeuristicEstimator(), 0.0,
                                ["system", "fewshot", "chat", "completion"])
    apgr = {(c.wording, c.estimator): c.apgr for c in cells}
    assert set(apgr) == {(w, e) for w in ("system", "fewshot")
                         for e in ("cascade-prompt", "cascade-prompt+heuristic")}
    # A third need the strong tier: sent first, all the gain comes by a third of the traffic
    # (APGR 1 - 1/6); sent last, only in the last third (1/6).
    assert apgr["system", "cascade-prompt"] == pytest.approx(5 / 6)
    assert apgr["fewshot", "cascade-prompt"] == pytest.approx(1 / 6)
    # Weight 0: the prior leaves the ranking as it is.
    assert apgr["system", "cascade-prompt+heuristic"] == apgr["system", "cascade-prompt"]


def _labelled(source: str, n: int, needs_strong: list[bool]) -> list[Example]:
    return [Example("s", f"{source} prompt {i}", weak=not hard, strong=True, source=source)
            for i, hard in zip(range(n), needs_strong, strict=True)]


def test_the_prior_weight_is_the_one_that_ranks_the_training_sources_best():
    """``router eval``'s ``<cascade row>+heuristic``: the weight is chosen on the training
    sources only (highest worst-source APGR, then mean, then the smallest)."""
    from gateway.routing.lodo import PRIOR_WEIGHTS, prior_weight
    from policies import CascadeSpec

    hard = [i % 2 == 0 for i in range(40)]
    examples = _labelled("a", 40, hard) + _labelled("b", 40, hard)
    separates = [0.8 if h else 0.2 for h in hard] * 2
    backwards = [0.2 if h else 0.8 for h in hard] * 2
    flat = [0.5] * 80
    # The probe says nothing, the prior tells the hard ones: the least weight that uses it.
    assert prior_weight(examples, flat, separates) == PRIOR_WEIGHTS[1]
    # The probe alone is right (a sure probe is a high confidence), the prior backwards: none.
    sure_when_easy = [1 - s for s in separates]
    assert prior_weight(examples, sure_when_easy, backwards) == 0.0
    # Both right, the prior only weakly: any weight keeps the order; the least is taken.
    assert prior_weight(examples, sure_when_easy, [0.5 + (s - 0.5) / 100 for s in separates]) \
        == 0.0
    # A source too small to judge by is ignored; with none left, the policy's default (not
    # the least of the weights offered).
    assert prior_weight(examples[:10], flat[:10], separates[:10], weights=(1.0, 2.0)) \
        == CascadeSpec().prior_weight
    # So is one whose APGR no weight moves by PRIOR_MIN_SPREAD, though it is the worst: from
    # 0.5 on, one hard prompt trades places with the easy one beside it (one step of APGR),
    # which a worst-source-first rule over every source would follow to 0.5.
    from gateway.routing.lodo import PRIOR_MIN_SPREAD, apgr_of, with_prior

    noise = _labelled("n", 40, [i % 4 == 0 for i in range(40)])
    sure = [0.2 + 0.015 * i for i in range(40)]
    prior = [0.5] * 40
    sure[20], prior[20] = sure[21] + 0.0005, 0.502  # hard, a hair surer than 21 (easy)

    def noise_apgr(w: float) -> float:
        return apgr_of([1 - with_prior(c, d, w) for c, d in zip(sure, prior, strict=True)],
                       noise)

    assert noise_apgr(0.25) < noise_apgr(0.5) < noise_apgr(0.25) + PRIOR_MIN_SPREAD
    assert noise_apgr(0.5) < 0.6  # the worst source, at every weight
    assert prior_weight(examples + noise, flat + sure, separates + prior) == PRIOR_WEIGHTS[1]
    assert prior_weight(noise, sure, prior) == 0.0  # alone, every weight ties: the least


def test_the_shipped_prior_weight_is_what_leave_one_out_picks_on_every_source():
    """``routing.cascade.prior_weight``'s default is :func:`prior_weight` over every labelled
    source the prompt signal was measured on, the same rule ``router eval`` applies without
    the held-out source."""
    from gateway.routing.estimators import HeuristicEstimator
    from gateway.routing.features import RequestText
    from gateway.routing.labels import load_sources
    from gateway.routing.lodo import prior_weight, text_confidence
    from gateway.routing.train import default_data_dir
    from policies import CascadeSpec

    examples = [e for rows in load_sources(default_data_dir()).values() for e in rows
                if e.prompt_logprob is not None]
    assert len({e.source for e in examples}) >= 3
    heuristic = HeuristicEstimator()
    prior = [heuristic.score_text(RequestText.of(request_for(e))).score for e in examples]
    sure = [text_confidence(e) or 0.0 for e in examples]
    assert prior_weight(examples, sure, prior) == CascadeSpec().prior_weight


def test_a_capacity_share_is_fixed_on_the_training_sources_and_cut_on_the_traffic():
    """The cascade rows' last column: the share each training source needs for 95% of its
    strong quality (least sure first), averaged; applied as the held-out traffic's own
    quantile, as a capacity window on the strong tier would."""
    from gateway.routing.lodo import at_share, fixed_share

    # Source a: 10 of 40 need the strong tier and are the least sure; the other 30 pass on
    # the cheap tier, so 95% of strong quality (38 of 40) needs 8 escalations: 20%.
    # Source b: 20 of 40 need it: 38 of 40 needs 18: 45%. Averaged: 32.5%.
    a = _labelled("a", 40, [i < 10 for i in range(40)])
    b = _labelled("b", 40, [i < 20 for i in range(40)])
    unsure = [1.0 - i / 100 for i in range(40)] * 2
    assert fixed_share(a + b, unsure) == pytest.approx((8 / 40 + 18 / 40) / 2)
    assert fixed_share(a[:10], unsure[:10]) == 1.0  # no source large enough: everything
    # On 8 held-out prompts, a 25% share escalates the two least sure.
    held = _labelled("c", 8, [True, False, False, False, False, False, False, True])
    scores = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
    _, quality, share = at_share(0.25, scores, held)
    assert share == 0.25 and quality == 1.0
    _, quality, share = at_share(0.125, scores, held)
    assert share == 0.125 and quality == pytest.approx(7 / 8)


def test_router_train_without_a_source_leaves_it_out_of_the_model(tmp_path, capsys):
    from gateway.cli import main
    from gateway.routing.semantic import SemanticModel

    for e in _synthetic():
        folder = tmp_path / "data" / e.source
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "labels.csv"
        with path.open("a", newline="") as fh:
            w = csv.writer(fh)
            if fh.tell() == 0:
                w.writerow(["prompt", "cheap_ok", "strong_ok"])
            w.writerow([e.prompt, int(e.weak), int(e.strong)])
    out = tmp_path / "sem.npz"
    argv = ["router", "train", "--estimator", "semantic", "--data", str(tmp_path / "data"),
            "--out", str(out)]
    assert main([*argv, "--without", "gamma"]) == 0
    model = SemanticModel.load(out)
    assert set(model.meta["sources"]) == {"alpha", "beta"} and "gamma" not in model.sources
    assert "alpha (40), beta (40)" in capsys.readouterr().out
    # A name that is not a source, or --without where it does not apply, says so.
    assert main([*argv, "--without", "delta"]) == 2
    assert "no labelled source delta" in capsys.readouterr().err
    assert main([*argv, "--without", " alpha, beta ,gamma"]) == 2  # names stripped
    assert "nothing left to train on" in capsys.readouterr().err
    assert main([*argv, "--without", ","]) == 2
    assert "--without names no source" in capsys.readouterr().err
    assert main(["router", "train", "--without", "gamma", "--data", str(tmp_path / "data")]) == 2
    assert "--without is for --estimator semantic" in capsys.readouterr().err
    # Without --out it would overwrite the shipped model with one that lacks a source.
    assert main(["router", "train", "--estimator", "semantic", "--without", "gamma",
                 "--data", str(tmp_path / "data")]) == 2
    assert "--without needs --out FILE" in capsys.readouterr().err


def test_a_threshold_for_the_files_traffic_and_how_it_holds_on_alternate_halves():
    """8 prompts, strong right on 7, cheap on 4 (rows 0, 3, 4, 7). By score, rows 1, 2, 5
    need the strong tier, so 95% of strong quality (6.65 of 7) needs all three: threshold
    0.7, all right, 3 of 8 sent strong. Even rows alone (strong 3, cheap 2) need row 2 only:
    0.8, which sends odd row 1 strong; odd rows (strong 4, cheap 2) need 1 and 5: 0.7, which
    sends even row 2. Those held-out decisions get 6 of 7 right (row 5 stays cheap) with 2 of
    8 strong; at 1 J cheap and 3 J strong, 12 J of always-strong's 24."""
    from gateway.routing.lodo import calibrate, threshold_95

    rows = [(1, 1, 0.1), (0, 1, 0.9), (0, 1, 0.8), (1, 1, 0.2), (1, 1, 0.3), (0, 1, 0.7),
            (0, 0, 0.6), (1, 1, 0.4)]
    scores = [r[2] for r in rows]
    unpriced = [Example("t", f"p{i}", w, s, "t") for i, (w, s, _) in enumerate(rows)]
    assert threshold_95(scores, unpriced) == 0.7
    assert calibrate(scores, unpriced) == {
        "threshold": 0.7, "quality": 1.0, "cost": 3 / 8, "halves_quality": 6 / 7,
        "halves_cost": 2 / 8, "cost_of": "strong share"}
    priced = [Example("t", f"p{i}", w, s, "t", "bare", 1.0, 3.0)
              for i, (w, s, _) in enumerate(rows)]
    got = calibrate(scores, priced)
    assert (got["cost"], got["halves_cost"], got["cost_of"]) == (14 / 24, 12 / 24, "joules")
    # A cheap tier that already keeps 95% needs no threshold at all.
    assert threshold_95([0.5, 0.1], [Example("t", "a", 1, 1, "t"), Example("t", "b", 1, 1, "t")]
                        ) is None
    # A tied block goes strong whole: the target is judged after all of it. At 0.5 the
    # needed prompt shares its score with one only the cheap tier gets right, so 0.5 keeps
    # 3 of 4 (75%); the block below (0.4) has to go as well.
    tied = [(0, 1, 0.5), (1, 0, 0.5), (0, 1, 0.4), (1, 1, 0.1)]
    examples = [Example("t", f"p{i}", w, s, "t") for i, (w, s, _) in enumerate(tied)]
    assert threshold_95([r[2] for r in tied], examples) == 0.4
    # Nothing to keep a share of, or no second half: not measured rather than invented.
    none_right = calibrate([0.2, 0.8], [Example("t", "a", 1, 0, "t"), Example("t", "b", 0, 0, "t")])
    assert none_right["threshold"] is None and none_right["quality"] is None
    one = calibrate([0.3], [Example("t", "a", 0, 1, "t")])
    assert one["threshold"] == 0.3 and one["halves_quality"] is None


def test_router_eval_labels_gives_each_estimator_its_threshold_for_the_file(tmp_path, capsys):
    rows, path = _probed(tmp_path)
    assert main(["router", "eval", "--labels", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["estimators"]
    needed = (1, 3)  # the rows only the strong tier gets right

    def value(setting):
        return float(setting.split(": ")[1])

    # The cascade escalates a confidence below its threshold: both cheap misses, nothing else.
    cascade = value(out["cascade"]["threshold_for_95pct"])
    confidences = [math.exp(sum(map(float, lp.split())) / 2) for *_, lp in rows]
    assert [c < cascade for c in confidences] == [i in needed for i in range(4)]
    # A difficulty threshold sends a score at or above it strong: both rows it needs (the
    # printed value is rounded down, never up past the lower of the two).
    heuristic = out["heuristic"]
    scores = heuristic["scores"]
    threshold = value(heuristic["threshold_for_95pct"])
    assert all(scores[i] >= threshold for i in needed)
    assert threshold > min(scores[i] for i in needed) - 1e-6
    # Alternate halves: the even rows (0, 2) are both right on the cheap tier, so they set
    # no threshold and the odd rows stay cheap, wrong; the odd rows need both of theirs,
    # whose threshold may send even rows strong, where both tiers are right: 2 of 4.
    halves = heuristic["alternate_halves"]
    assert halves["cost_of"] == "strong share" and halves["quality_share"] == 0.5
    assert halves["cost_share"] == sum(scores[i] >= min(scores[j] for j in needed)
                                       for i in (0, 2)) / 4
    assert main(["router", "eval", "--labels", str(path)]) == 0
    assert f"routing.cascade.threshold: {cascade:.6f}" in capsys.readouterr().out
