"""What people read of a run's GGUF files: `status`'s line per file, the status page and the notification, from
the run record's results as JSON carries them (a hostile record's odd values read as missing)."""

import html
import math

from mergebot.daemon.notify import message
from mergebot.daemon.page import page_html
from mergebot.daemon.status import gguf_line, gguf_results

PASSED = {"file": "t-Q8_0.gguf", "repo": "me/t", "size": 145_600_000, "sha256": "ab" * 32, "perplexity": 12.41,
          "stop_rate": 0.5, "passed": True, "reason": None, "published": True, "reused": True}  # fmt: skip
REFUSED = {"file": "t-BF16.gguf", "repo": "me/t", "size": 0, "perplexity": None, "stop_rate": None,
           "passed": False, "reason": "tokenizer.json: no GGUF for a <WordLevel> tokenizer", "published": False,
           "reused": False}  # fmt: skip


def test_each_gguf_file_in_a_line_saying_whether_it_went_out_or_why_not():
    results = gguf_results({"Q8_0": PASSED, "BF16": REFUSED})
    assert gguf_line("Q8_0", results["Q8_0"]) == (
        "Q8_0 145.6 MB, perplexity 12.41 (not reconverted): published in me/t"
    )
    assert gguf_line("BF16", results["BF16"]) == f"BF16 no file: not published: {REFUSED['reason']}"


def test_a_hostile_records_values_read_as_missing():
    odd = {"file": 3, "repo": ["me/t"], "size": True, "perplexity": math.nan, "stop_rate": "all", "published": "yes"}
    (result,) = gguf_results({"Q8_0": odd}).values()
    assert result == {"file": None, "repo": None, "size": None, "perplexity": None, "stop_rate": None,
                      "published": False, "reused": False, "reason": None}  # fmt: skip


def test_the_page_and_the_notification_say_it_escaped():
    results = gguf_results({"Q8_0": PASSED, "BF16": REFUSED})
    run = {"id": 2, "outcome": "published", "seconds": 9.0, "merge_ppl": 12.3, "parent_ppl": {}, "kl": {},
           "stop_rate": None, "computed": 0, "reused": 4, "gguf": results}  # fmt: skip
    target = {"repo": "me/t", "when": "on_change", "inputs": {}, "last_run": None, "recent_runs": [run],
              "state": "up_to_date", "waiting": "up to date", "next_check": None, "published_sha": "c" * 40,
              "published_url": "http://hub/me/t/tree/" + "c" * 40}  # fmt: skip
    page = page_html({"as_of": "2026-01-01T00:02:00+00:00", "targets": {"t": target}})
    assert html.escape(gguf_line("BF16", results["BF16"])) in page and "<WordLevel>" not in page
    event = {"event": "published", "repo": "me/t", "revision": "c" * 40, "url": "http://hub/x", "culprit": None,
             "reason": None, "inputs": {}, "shards": {"recomputed": [], "reused": ["a"]}, "gguf": results,
             "validation": {"merge_ppl": 12.3}}  # fmt: skip
    text = message(event, lambda label, url: f"[{label}]({url})", lambda text: text.replace("<", "&lt;"))
    assert text.endswith(f" GGUF {gguf_line('Q8_0', results['Q8_0'])}. GGUF BF16 no file: not published: "
                         "tokenizer.json: no GGUF for a &lt;WordLevel> tokenizer.")  # fmt: skip
