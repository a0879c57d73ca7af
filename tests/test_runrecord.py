"""The run record: one typed, versioned record, written and read by one pair of functions; rows written before it
had a version still read."""

import json
import math

import pytest

from mergebot.errors import StateError
from mergebot.runrecord import VERSION, Figures, Outcome, RunRecord, from_json, to_json

# A record as the merge child wrote it before the record was typed (the daemon added digests, the Ray executor
# the node; a daemon that gave up added gave_up), as the state's details column holds it.
TODAYS_ROW = {
    "target": "t",
    "inputs": {"org/a": "a" * 40},
    "outcome": "published",
    "reason": None,
    "culprit": None,
    "published_sha": "p" * 40,
    "computed": ["model-00001-of-00002.safetensors"],
    "reused": ["model-00002-of-00002.safetensors"],
    "fingerprints": {"model-00001-of-00002.safetensors": "f1"},
    "uploaded": ["model-00001-of-00002.safetensors", "README.md"],
    "downloaded_bytes": 1000,
    "uploaded_bytes": 300,
    "merge_ppl": 9.5,
    "parent_ppl": {"org/a": 10.0, "org/b": None},
    "kl": {"org/a": 0.01},
    "seconds": 12.5,
    "digests": {"org/a": "d1"},
    "ray_node": "node-1",
}


def test_a_row_in_todays_format_reads_into_the_typed_record():
    record = from_json(json.dumps(TODAYS_ROW))
    assert record.outcome is Outcome.PUBLISHED
    assert record.figures == {"merge_ppl": 9.5, "parent_ppl": {"org/a": 10.0, "org/b": None}, "kl": {"org/a": 0.01}}
    assert (record.node, record.digests, record.inputs) == ("node-1", {"org/a": "d1"}, {"org/a": "a" * 40})
    assert (record.computed, record.downloaded_bytes, record.seconds) == (TODAYS_ROW["computed"], 1000, 12.5)
    assert from_json(to_json(record)) == record


def test_keys_it_does_not_know_are_left_out():
    assert from_json('{"version": 2, "from_a_newer_check": 1}') == RunRecord()


def test_a_timeout_row_with_only_a_reason_reads():
    record = from_json('{"reason": "merge_timeout of 60 s exceeded", "digests": {"org/a": "d1"}}')
    assert (record.outcome, record.reason, record.figures) == (Outcome.FAILED, "merge_timeout of 60 s exceeded", {})


def test_the_record_round_trips_with_its_version_and_open_figures():
    figures = Figures(merge_ppl=math.inf, parent_ppl={}, kl={})
    figures["chat_probe_agreement"] = 0.75  # type: ignore[typeddict-unknown-key]  # a check's own figure
    record = RunRecord(Outcome.INTERNAL_ERROR, "internal error: KeyError: 'x'", figures=figures, gave_up=True)
    text = to_json(record)
    assert json.loads(text)["version"] == VERSION
    assert from_json(text) == record


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "must be a JSON object"),
        ("{", "not JSON"),
        ('{"version": 99}', "version 99"),
        ('{"version": 2, "outcome": "exploded"}', "bad value"),
        ('{"version": 2, "computed": 1}', "computed holds a bad value: 1"),
        ('{"version": 2, "reason": ["x"]}', "reason holds a bad value"),
    ],
)
def test_a_bad_record_is_one_line_naming_what_is_wrong(text, message):
    with pytest.raises(StateError, match=message):
        from_json(text)
