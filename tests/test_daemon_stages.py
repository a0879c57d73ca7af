"""A daemon target that reads another target's merge (`model = "target:NAME"`), with the real daemon process
against the local Hub: the upstream target runs first, a change upstream re-runs both in order, a change of the
reader's own config re-runs only the reader, and an upstream run that changes nothing re-runs nothing downstream."""

import time

from mergebot.config.daemon import check_daemon_config, load_daemon_config
from tests import test_daemon
from tests.helpers import run_cli
from tests.test_daemon import Setup, published_runs, wait_for

setup = test_daemon.setup
"""The fixture of the daemon tests: upstream models on the local Hub, a config file and the daemon process."""

FIRST = """
[[targets]]
name = "first"
repo = "me/first"
merge_method = "slerp"
base_model = "org/base"
models = [{ model = "org/base" }, { model = "org/ft1" }]
parameters = { t = 0.4 }
out_shard_size = "40KB"
"""


def second(weight: float = 0.5) -> str:
    """The reader, written before the target it reads: the daemon orders them itself."""
    return (
        '\n[[targets]]\nname = "second"\nrepo = "me/second"\nmerge_method = "linear"\n'
        f'models = [{{ model = "target:first", parameters = {{ weight = {weight} }} }}, '
        '{ model = "org/ft2", parameters = { weight = 0.5 } }]\nout_shard_size = "40KB"\n'
    )


IN_ORDER = (("run started", "first"), ("run finished", "first"), ("run started", "second"), ("run finished", "second"))


def runs(setup: Setup) -> list[tuple[str, str]]:
    """(event, target) of every run started and finished, in order."""
    events = ("run started", "run finished")
    return [(e["event"], e["target"]) for e in setup.events() if e.get("event") in events]


def test_a_target_reading_another_runs_after_it_and_only_when_its_merge_changed(setup):
    setup.write_config(second() + FIRST)
    config = load_daemon_config(setup.config)
    assert list(config.targets) == ["first", "second"] and config.targets["second"].reads == ("first",)
    setup.start()
    wait_for(lambda: len(published_runs(setup, "second")) == 1, what="both targets merged")
    assert runs(setup) == [*IN_ORDER]
    status = setup.status()["targets"]["second"]
    assert status["last_run"]["inputs"]["target:first"].startswith("local:")

    setup.change_shard("ft1")
    wait_for(lambda: len(published_runs(setup, "second")) == 2, what="both re-run after the upstream change")
    assert runs(setup)[4:] == [*IN_ORDER]
    card = setup.card("me/second").text
    assert "target:first" in card

    setup.write_config(second(weight=0.8) + FIRST)
    wait_for(lambda: len(published_runs(setup, "second")) == 3, what="the reader re-run after its own change")
    assert [target for event, target in runs(setup)[8:] if event == "run started"] == ["second"]

    setup.write_config(
        second(weight=0.8)
        + FIRST.replace('out_shard_size = "40KB"', 'out_shard_size = "40KB"\nvalidate = { max_ppl_ratio = 3 }')
    )
    wait_for(lambda: len(published_runs(setup, "first")) == 3, what="the upstream re-run after its own change")
    merged = [e for e in setup.events() if e.get("event") == "merged" and e.get("target") == "first"]
    assert merged[-1]["computed"] == 0, "its validation settings changed, not its merge"
    time.sleep(3)
    assert len(published_runs(setup, "second")) == 3, "an upstream merge that did not change re-runs nothing"
    assert setup.stop() == 0


def test_a_reader_waits_while_the_target_it_reads_fails(setup):
    broken = FIRST.replace(
        "parameters = { t = 0.4 }",
        "parameters = { t = 0.4 }\nvalidate = { max_ppl_ratio = 1.0000001, max_kl = 0.0000001 }",
    )
    setup.write_config(second() + broken)
    setup.start()
    wait_for(lambda: any(e.get("event") == "run failed" for e in setup.events()), what="the upstream to fail its gate")
    waiting = wait_for(
        lambda: "waits for target first" in (w := setup.status()["targets"]["second"]["waiting"] or "") and w,
        what="the reader to wait",
    )
    assert "its last run failed" in waiting
    assert [target for event, target in runs(setup) if event == "run started"] == ["first"]
    assert setup.head("me/second") is None
    assert setup.stop() == 0


def problems(tmp_path, targets: str) -> list[str]:
    config = tmp_path / "mergebot.toml"
    config.write_text(f'[daemon]\nstate_dir = "state"\n{targets}')
    return [str(problem) for problem in check_daemon_config(config)[1]]


def test_a_missing_or_circular_target_is_refused_with_its_line(tmp_path):
    config = tmp_path / "mergebot.toml"
    assert problems(tmp_path, second().replace("target:first", "target:frist") + FIRST) == [
        f"{config}:8: targets[0].models[0].model: 'target:frist': no target is named 'frist' (targets: first, second)"
    ]
    circular = second() + FIRST.replace('{ model = "org/ft1" }', '{ model = "target:second" }')
    assert problems(tmp_path, circular) == [
        f"{config}:5: targets[0].name: its merge reads itself: second → first → second"
    ]


def test_target_names_outside_the_daemon_and_multi_stage_files_inside_it_are_refused(tmp_path, capsys):
    (tmp_path / "multi.yml").write_text("name: a\nmerge_method: linear\n---\nmerge_method: linear\n")
    config = tmp_path / "mergebot.toml"
    assert problems(tmp_path, FIRST + '\n[[targets]]\nname = "m"\nrepo = "me/m"\nmergekit_config = "multi.yml"\n') == [
        f"{tmp_path / 'multi.yml'}:3: invalid YAML: several YAML documents: a multi-stage merge, which `mergebot "
        'merge FILE OUT_DIR` runs; a daemon target chains stages as targets instead (model = "target:NAME")'
    ]
    config.write_text(f'[daemon]\nstate_dir = "state"\n{second()}{FIRST}')
    assert run_cli("merge", config, "--target", "second", tmp_path / "out") == 2
    assert "'target:first' names another target's merge: only in a daemon config" in capsys.readouterr().err
