"""The pure decision (target, what its inputs hold now, what the state says -> action), in-process in
milliseconds: the daemon's polls and `mergebot once` both carry out what it says."""

from dataclasses import replace
from datetime import UTC

import pytest

from mergebot.config.daemon import load_daemon_config
from mergebot.daemon.decide import Act, Action, Facts, decide, window_passed
from mergebot.daemon.runs import Run
from mergebot.runrecord import Outcome, RunRecord
from tests.test_daemon import target

DIGESTS = {"org/base": "d-base", "org/ft1": "d-ft1"}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    path = tmp_path_factory.mktemp("decide") / "mergebot.toml"
    path.write_text('[daemon]\nstate_dir = "state"\n' + target("t") + target("n", extra='when = "nightly"\n'))
    return load_daemon_config(path).targets


def run(t, outcome: Outcome, digests=DIGESTS, *, transient=False, reason=None, started=0.0) -> Run:
    record = RunRecord(outcome, reason, digests=dict(digests))
    return Run(1, t.name, t.config_hash, {}, started, started, outcome, reason, transient, None, record)


def facts(last=None, success=None, released=False, window=False) -> Facts:
    return Facts(last, success, released, window)


def test_never_merged_runs_and_the_same_content_is_up_to_date(targets):
    t = targets["t"]
    assert decide(t, DIGESTS, facts()) == Action(Act.RUN, "never merged")
    done = run(t, Outcome.PUBLISHED)
    assert decide(t, DIGESTS, facts(done, done)) == Action(Act.UP_TO_DATE, None)
    moved = DIGESTS | {"org/ft1": "d-new"}
    assert decide(t, moved, facts(done, done)) == Action(Act.RUN, "new upstream content in org/ft1")
    assert (
        decide(t, DIGESTS, facts(done, replace(done, config_hash="old"))).why
        == "its config changed (merge, validation or GGUF settings)"
    )


def test_a_refusal_on_the_same_content_waits_and_a_release_runs(targets):
    t = targets["t"]
    done = run(t, Outcome.PUBLISHED, {"org/base": "d-base", "org/ft1": "d-old"})
    failed = run(t, Outcome.FAILED, reason="validation failed")
    assert decide(t, DIGESTS, facts(failed, done)).act == Act.WAIT_FOR_CHANGE
    held = run(t, Outcome.HELD, reason="org/ft1 worse")
    assert decide(t, DIGESTS, facts(held, done)) == Action(Act.HOLD, "org/ft1 worse")
    assert decide(t, DIGESTS, facts(held, done, released=True)).act == Act.RELEASED
    transient = run(t, Outcome.FAILED, transient=True)
    crashed = run(t, Outcome.INTERNAL_ERROR, transient=True)
    for last in (transient, crashed):
        assert decide(t, DIGESTS, facts(last, done)).act == Act.RUN, "retried failures do not block a run"


def test_a_nightly_target_waits_for_its_window_unless_one_passed_or_once_runs_it(targets):
    n = targets["n"]
    assert decide(n, DIGESTS, facts()).act == Act.WAIT_FOR_WINDOW
    assert decide(n, DIGESTS, facts(window=True)).act == Act.RUN
    assert decide(n, DIGESTS, facts(), now=True).act == Act.RUN


def test_a_window_passed_since_the_last_run(targets):
    assert not window_passed(None, "0 3 * * *", UTC)
    assert window_passed(run(targets["n"], Outcome.PUBLISHED, started=0.0), "0 3 * * *", UTC)
