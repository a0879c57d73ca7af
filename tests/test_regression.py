"""The daemon's comparison with the last publish: the baseline read back from a run record, and when a run is held
(an input that got worse since that publish, or a merge clearly worse than the published one)."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mergebot.config.daemon import ValidateSettings
from mergebot.pipeline.parents import ParentResult
from mergebot.pipeline.perplexity import TOP_TOKENS, Signature
from mergebot.pipeline.probe import ProbeResult
from mergebot.pipeline.regression import Baseline, Hold, baseline_from_record, held_reason
from mergebot.pipeline.report import ValidationReport
from mergebot.runrecord import Figures, Outcome, RunRecord, from_json, to_json

PUBLISHED = "c0ffee" * 7
OLD_A, NEW_A = "a" * 40, "1234567890ab" + "f" * 28
LOCAL_OLD, LOCAL_NEW = "local:" + "0d" * 32, "local:" + "e5" * 32
SETTINGS = ValidateSettings()
BASELINE = Baseline(PUBLISHED, merge_ppl=10.0, inputs={"org/a": (OLD_A, 10.0), "org/b": ("b" * 40, 12.0)})


def result(name: str, revision: str, ppl: float) -> ParentResult:
    """A parent as the gate measured it (only its perplexity matters here)."""
    empty = torch.empty(0, TOP_TOKENS)
    signature = Signature(ppl, torch.tensor([1, 5]), empty.long(), empty)
    return ParentResult(name, Path(name), revision, signature, cached=False)


def report(merge_ppl: float | None, **ppl: float) -> ValidationReport:
    """A gate report with a merge perplexity and parents org/a and org/b at the revisions `identities` gives."""
    ids = identities()
    parents = [result(f"org/{name}", ids[f"org/{name}"], value) for name, value in ppl.items()]
    return ValidationReport(out_dir=Path("merged"), checks=[], merge_ppl=merge_ppl, parents=parents)


def identities(a: str = NEW_A) -> dict[str, str]:
    return {"org/a": a, "org/b": "b" * 40}


def test_baseline_comes_from_a_published_runs_record() -> None:
    # org/b was not measured: nothing to compare it with later
    figures = Figures(merge_ppl=9.5, parent_ppl={"org/a": 10.0, "org/b": None})
    run = RunRecord(Outcome.PUBLISHED, inputs=identities(), published_sha=PUBLISHED, figures=figures)
    baseline = baseline_from_record(PUBLISHED, run.inputs, run)
    assert baseline == Baseline(PUBLISHED, 9.5, {"org/a": (NEW_A, 10.0)})


@pytest.mark.parametrize(
    ("published_sha", "figures"),
    [(PUBLISHED, {"parent_ppl": {"org/a": 10.0}}), (PUBLISHED, {}), (None, {"merge_ppl": 9.5}), ("", {})],
)
def test_a_record_without_the_figures_gives_no_baseline(published_sha: str | None, figures: Figures) -> None:
    assert baseline_from_record(published_sha, identities(), RunRecord(figures=figures)) is None


@pytest.mark.parametrize(
    ("old", "new", "shown_old", "shown_new"),
    [(OLD_A, NEW_A, "a" * 12, "1234567890ab"), (LOCAL_OLD, LOCAL_NEW, "0d" * 6, "e5" * 6)],
)
def test_an_input_that_changed_and_got_worse_holds_naming_it(
    old: str, new: str, shown_old: str, shown_new: str
) -> None:
    baseline = Baseline(PUBLISHED, 10.0, {"org/a": (old, 10.0), "org/b": ("b" * 40, 12.0)})
    hold = held_reason(baseline, report(10.0, a=15.1, b=12.0), identities(new), SETTINGS)
    expected = (
        f"org/a@{shown_new}: perplexity 10.0 → 15.1 since the last publish ({shown_old}); "
        f"holding at revision {PUBLISHED[:12]}"
    )
    assert hold == Hold(expected, "org/a")


def test_an_input_whose_perplexity_is_no_longer_finite_holds() -> None:
    hold = held_reason(BASELINE, report(10.0, a=math.nan, b=12.0), identities(), SETTINGS)
    assert hold is not None and hold.culprit == "org/a" and "perplexity 10.0 → nan" in hold.reason


def test_an_unchanged_input_never_holds() -> None:
    assert held_reason(BASELINE, report(10.0, a=5000.0, b=12.0), identities(OLD_A), SETTINGS) is None


def test_an_input_within_the_jump_or_new_since_the_publish_does_not_hold() -> None:
    assert held_reason(BASELINE, report(10.0, a=15.0, b=12.0), identities(), SETTINGS) is None  # exactly 1.5x
    unknown = Baseline(PUBLISHED, 10.0, {"org/b": ("b" * 40, 12.0)})
    assert held_reason(unknown, report(10.0, a=500.0, b=12.0), identities(), SETTINGS) is None


def test_the_limits_come_from_the_settings() -> None:
    stricter = ValidateSettings(max_input_jump=1.4, max_regression=1.1)
    assert held_reason(BASELINE, report(10.0, a=15.0, b=12.0), identities(), stricter).culprit == "org/a"
    assert held_reason(BASELINE, report(11.5, a=10.0, b=12.0), identities(), stricter).culprit is None


def test_a_merge_worse_than_the_published_one_holds_blaming_no_input() -> None:
    hold = held_reason(BASELINE, report(12.6, a=10.0, b=12.0), identities(), SETTINGS)
    expected = (
        "the merge's perplexity 12.6 is 1.26x the last published merge's 10.0 (limit 1.25x); "
        f"holding at revision {PUBLISHED[:12]}"
    )
    assert hold == Hold(expected, None)


def test_an_input_that_got_worse_is_named_before_the_merge() -> None:
    hold = held_reason(BASELINE, report(100.0, a=100.0, b=12.0), identities(), SETTINGS)
    assert hold is not None and hold.culprit == "org/a"


@pytest.mark.parametrize("merge_ppl", [12.5, 8.0, None])
def test_a_run_within_the_limits_is_not_held(merge_ppl: float | None) -> None:
    assert held_reason(BASELINE, report(merge_ppl, a=14.0, b=12.0), identities(), SETTINGS) is None


def test_after_a_config_change_only_the_inputs_are_compared() -> None:
    figures = Figures(merge_ppl=10.0, parent_ppl={"org/a": 10.0, "org/b": 12.0})
    run = RunRecord(Outcome.PUBLISHED, inputs=identities(OLD_A), published_sha=PUBLISHED, figures=figures)
    changed = baseline_from_record(PUBLISHED, run.inputs, run, same_merge=False)
    assert changed is not None and changed.merge_ppl is None
    assert held_reason(changed, report(30.0, a=10.0, b=12.0), identities(), SETTINGS) is None
    hold = held_reason(changed, report(30.0, a=40.0, b=12.0), identities(), SETTINGS)
    assert hold is not None and hold.culprit == "org/a"


def test_an_input_whose_eos_id_changed_since_the_publish_holds_naming_it() -> None:
    before = {"config.eos_token_id": "2 <|im_end|>", "rope_theta": "100000.0"}
    baseline = Baseline(PUBLISHED, 10.0, dict(BASELINE.inputs), facts={"org/a": (OLD_A, before)})
    now = replace(report(10.0, a=10.0, b=12.0), facts={"org/a": {**before, "config.eos_token_id": "0 <|endoftext|>"}})
    hold = held_reason(baseline, now, identities(), SETTINGS)
    assert hold is not None and hold.culprit == "org/a"
    assert hold.reason.startswith("org/a@1234567890ab: config.eos_token_id 2 <|im_end|> → 0 <|endoftext|> since")
    assert f"holding at revision {PUBLISHED[:12]}" in hold.reason
    assert held_reason(baseline, now, identities(OLD_A), SETTINGS) is None  # the same revision: nothing changed
    accepting = replace(now, settings=ValidateSettings(accept_config_fields=("eos_token_id",)))
    assert held_reason(baseline, accepting, identities(), SETTINGS) is None


def test_a_merge_that_stopped_stopping_holds() -> None:
    baseline = Baseline(PUBLISHED, 10.0, dict(BASELINE.inputs), stop_rate=1.0)
    never = replace(report(10.0, a=10.0, b=12.0), probe=ProbeResult([False] * 6, [0.0] * 6))
    hold = held_reason(baseline, never, identities(), SETTINGS)
    assert hold is not None and hold.culprit is None and "ends its turn on 0% of the probe prompts" in hold.reason
    usual = replace(never, probe=ProbeResult([True] * 5 + [False], [0.5] * 6))
    assert held_reason(baseline, usual, identities(), SETTINGS) is None


def test_the_baseline_reads_the_probe_and_facts_back_from_the_record() -> None:
    figures = Figures(merge_ppl=9.5, parent_ppl={"org/a": 10.0}, stop_rate=0.75)
    figures["input_facts"] = {"org/a": {"chat_template": "abc"}}
    run = RunRecord(Outcome.PUBLISHED, inputs=identities(), published_sha=PUBLISHED, figures=figures)
    stored = from_json(to_json(run))
    baseline = baseline_from_record(PUBLISHED, run.inputs, stored)
    assert baseline.stop_rate == 0.75 and baseline.facts == {"org/a": (NEW_A, {"chat_template": "abc"})}
    assert baseline_from_record(PUBLISHED, run.inputs, stored, same_merge=False).stop_rate is None
