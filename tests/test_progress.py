"""Progress of `mergebot merge` and `validate`: JSON lines off a terminal (a shard, a validation step each, then one
summary line), a bar with an ETA on one."""

import io
import json
import sys

from mergebot.dev.synthetic import make_model
from mergebot.progress import ShardProgress, StepProgress
from tests.helpers import run_cli_process


def _events(stderr: str) -> list[dict]:
    """Every stderr line, each of which must be JSON."""
    return [json.loads(line) for line in stderr.splitlines()]


def test_off_a_terminal_merge_and_validate_log_json_lines_and_one_summary(tmp_path):
    base = make_model(tmp_path / "a", layers=2, hidden=32, intermediate=64, vocab=300)
    tuned = make_model(tmp_path / "b", base=base, seed=1)
    out = tmp_path / "out"
    merged = run_cli_process(
        "merge", "--method", "linear", f"{base}:0.5", f"{tuned}:0.5", out, "--out-shard-size", "20KB"
    )
    assert merged.returncode == 0, merged.stderr
    events = _events(merged.stderr)
    shards = [e for e in events if e["event"] == "shard"]
    assert len(shards) > 1 and all(e["outcome"] == "computed" for e in shards)
    assert events[-1]["event"] == "merged" and events[-1]["shards"] == len(shards) and events[-1]["seconds"] >= 0
    assert [e["event"] for e in events].count("merged") == 1

    validated = run_cli_process("validate", out)
    assert validated.returncode == 0, validated.stderr
    events = _events(validated.stderr)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["number"] for e in steps] == list(range(1, len(steps) + 1)) and steps[-1]["of"] == len(steps)
    assert {f"measure parent {base}", f"measure parent {tuned}", "load merge"} <= {e["step"] for e in steps}
    assert events[-1]["event"] == "validated" and events[-1]["passed"] is True
    assert "PASSED" in validated.stdout


def test_on_a_terminal_one_bar_with_an_eta(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    shards = ShardProgress(enabled_bar=True)
    shards.begin(2, 2000)
    shards.start("model-00001-of-00002.safetensors", 1000)
    shards.advance(1000)
    shards.done("model-00001-of-00002.safetensors", "computed", 1000)
    shards.start("model-00002-of-00002.safetensors", 1000)
    shards.done("model-00002-of-00002.safetensors", "reused", 1000)
    shards.close()
    text = stderr.getvalue()
    assert "merge, 2 shards" in text and "2.00k/2.00k" in text and "<00:00" in text  # elapsed<remaining: the ETA
    assert '"event"' not in text, "no log line per shard under the bar"

    stderr.truncate(0)
    steps = StepProgress("validate", 3, enabled_bar=True)
    for name in ("config", "load merge", "measure merge"):
        steps.step(name)
    steps.close()
    text = stderr.getvalue()
    assert "validate" in text and "load merge" in text and "2/3" in text and "<" in text
