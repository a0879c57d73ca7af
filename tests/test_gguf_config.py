"""A target's GGUF settings: checked with their line like every key, in TOML targets and mergekit_config targets
alike; a change of them alone makes the target due; a GGUF file whose commit to its own repo failed makes it due
again; the run record carries each file's result."""

from pathlib import Path

import pytest

from mergebot.config.daemon import check_daemon_config
from mergebot.config.document import read_document
from mergebot.config.gguf import WRITTEN_TYPES, GgufSettings, gguf_settings, published_names
from mergebot.daemon.decide import Act, Facts, decide
from mergebot.daemon.runs import Run
from mergebot.errors import ConfigError, StateError
from mergebot.runrecord import GgufResult, Outcome, RunRecord, from_json, to_json

DAEMON = '[daemon]\nstate_dir = "state"\n'
TARGET = (
    '[[targets]]\nname = "t"\nrepo = "me/t"\nmerge_method = "slerp"\nbase_model = "org/a"\n'
    'models = [{ model = "org/a" }, { model = "org/b" }]\nparameters = { t = 0.5 }\n'
)
DIGESTS = {"org/a": "d-a", "org/b": "d-b"}


def load(tmp_path: Path, extra: str) -> tuple[object, list[str]]:
    path = tmp_path / "mergebot.toml"
    path.write_text(f"{DAEMON}{TARGET}{extra}")
    config, problems = check_daemon_config(path)
    return config, [str(problem) for problem in problems]


def test_gguf_types_go_to_the_targets_repo_unless_a_sibling_is_named(tmp_path):
    config, problems = load(tmp_path, 'gguf = ["Q8_0", "BF16"]\n')
    assert not problems
    settings = config.targets["t"].gguf
    assert settings == GgufSettings(("Q8_0", "BF16"), "me/t")
    assert settings.file_name("Q8_0") == "t-Q8_0.gguf"
    config, problems = load(tmp_path, 'gguf = ["Q8_0"]\ngguf_repo = "me/t-GGUF"\n')
    assert not problems and config.targets["t"].gguf.repo == "me/t-GGUF"
    assert config.targets["t"].gguf.file_name("Q8_0") == "t-Q8_0.gguf", "the community's names, in either repo"
    assert {"t-Q8_0.gguf", "t-BF16.gguf", "t-Q4_K_M.gguf"} <= published_names("me/t")
    config, problems = load(tmp_path, "")
    assert not problems and config.targets["t"].gguf is None


@pytest.mark.parametrize(
    ("extra", "line", "message"),
    [
        ('gguf = ["Q8_O"]\n', 10, "targets[0].gguf: 'Q8_O' is not a GGUF type (known: F16, BF16, Q8_0; with"),
        ('gguf = "Q8_0"\n', 10, "targets[0].gguf: must be a list of GGUF types, e.g. ['Q8_0', 'BF16']"),
        ("gguf = []\n", 10, "targets[0].gguf: must be a list of GGUF types"),
        ('gguf = ["Q8_0", "Q8_0"]\n', 10, "targets[0].gguf: names a type twice"),
        ('gguf_repo = "me/t-GGUF"\n', 10, "targets[0].gguf_repo: needs gguf: the GGUF types to publish there"),
        ('gguf = ["BF16"]\ngguf_repo = "t-GGUF"\n', 11, "targets[0].gguf_repo: must be a Hub repo as org/name"),
        ('guff = ["Q8_0"]\n', 10, "targets[0].guff: unknown key (known: "),
    ],
)
def test_a_bad_gguf_setting_is_one_line_naming_its_key_and_line(tmp_path, extra, line, message):
    _, problems = load(tmp_path, extra)
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'mergebot.toml'}:{line}: {message}"), problems


def test_a_misspelt_type_or_key_gets_a_did_you_mean(tmp_path):
    (problem,) = load(tmp_path, 'gguf = ["q8_0"]\n')[1]
    assert problem.endswith("; did you mean 'Q8_0'?")
    (problem,) = load(tmp_path, 'gguf = ["BF16"]\ngguf_rep = "me/x"\n')[1]
    assert problem.endswith("; did you mean 'gguf_repo'?")


def test_a_k_quant_needs_llama_cpps_quantizer(tmp_path):
    path = tmp_path / "mergebot.toml"
    path.write_text(f'{DAEMON}{TARGET}gguf = ["Q8_0", "Q4_K_M"]\n')
    document, located = read_document(path)
    raw = document["targets"][0]
    with pytest.raises(ConfigError) as refused:
        gguf_settings(raw, located, "targets[0].", "me/t", quantizer=False)
    assert str(refused.value) == (
        f"{path}:10: targets[0].gguf: Q4_K_M needs llama.cpp's quantizer: pip install -c constraints.txt "
        "-e '.[llama-cpp]' (llama-cpp-python)"
    )
    assert gguf_settings(raw, located, "targets[0].", "me/t", quantizer=True).types == ("Q8_0", "Q4_K_M")


def test_a_mergekit_config_target_takes_the_gguf_keys_too(tmp_path):
    (tmp_path / "merge.yml").write_text(
        "merge_method: slerp\nbase_model: org/a\nmodels:\n  - model: org/a\n  - model: org/b\nparameters:\n  t: 0.5\n"
    )
    path = tmp_path / "mergebot.toml"
    path.write_text(f'{DAEMON}[[targets]]\nname = "k"\nrepo = "me/k"\nmergekit_config = "merge.yml"\ngguf = ["F16"]\n')
    config, problems = check_daemon_config(path)
    assert not problems and config.targets["k"].gguf == GgufSettings(("F16",), "me/k")
    path.write_text(f'{DAEMON}[[targets]]\nname = "k"\nrepo = "me/k"\nmergekit_config = "merge.yml"\ngguf = ["F15"]\n')
    (problem,) = map(str, check_daemon_config(path)[1])
    assert problem.startswith(f"{path}:7: targets[0].gguf: 'F15' is not a GGUF type") and "did you mean" in problem


def test_a_change_of_the_gguf_settings_alone_makes_the_target_due(tmp_path):
    plain = load(tmp_path, "")[0].targets["t"]
    q8 = load(tmp_path, 'gguf = ["Q8_0"]\n')[0].targets["t"]
    both = load(tmp_path, 'gguf = ["Q8_0", "BF16"]\n')[0].targets["t"]
    sibling = load(tmp_path, 'gguf = ["Q8_0"]\ngguf_repo = "me/t-GGUF"\n')[0].targets["t"]
    assert plain.merge == q8.merge == both.merge, "the merge itself is the same"
    assert len({plain.config_hash, q8.config_hash, both.config_hash, sibling.config_hash}) == 4
    done = published(plain, {})
    assert decide(q8, DIGESTS, Facts(done, done, False, False)).act == Act.RUN


def published(target, gguf: dict[str, GgufResult]) -> Run:
    record = RunRecord(Outcome.PUBLISHED, digests=dict(DIGESTS), gguf=gguf)
    return Run(1, target.name, target.config_hash, {}, 0.0, 1.0, Outcome.PUBLISHED, None, False, "a" * 40, record)


def test_gguf_files_whose_commit_failed_make_the_target_due_until_they_are_published(tmp_path):
    target = load(tmp_path, 'gguf = ["Q8_0", "BF16"]\ngguf_repo = "me/t-GGUF"\n')[0].targets["t"]
    failed = GgufResult(file="t-Q8_0.gguf", passed=False, published=False, reason="perplexity 3x the merge's")
    pending = GgufResult(file="t-BF16.gguf", passed=True, published=False, reason="the commit to me/t-GGUF failed")
    done = published(target, {"Q8_0": failed, "BF16": pending})
    action = decide(target, DIGESTS, Facts(done, done, False, False))
    assert (action.act, action.why) == (Act.RUN, "its GGUF files BF16 are not in me/t-GGUF yet")
    settled = published(target, {"Q8_0": failed, "BF16": pending | {"published": True, "reason": None}})
    assert decide(target, DIGESTS, Facts(settled, settled, False, False)).act == Act.UP_TO_DATE, (
        "a file its checks refused waits for a new merge: converting the same files again fails again"
    )
    recovered = published(target, {})  # a publish whose record a kill lost: the sibling's commit may not be done
    action = decide(target, DIGESTS, Facts(recovered, recovered, False, False))
    assert (action.act, action.why) == (Act.RUN, "its GGUF files Q8_0, BF16 are not in me/t-GGUF yet")


def test_the_run_record_carries_each_gguf_result_and_refuses_a_bad_one():
    result = GgufResult(file="t-Q8_0.gguf", repo="me/t", size=145_000_000, sha256="ab" * 32, perplexity=12.5,
                        stop_rate=0.5, passed=True, reason=None, published=True, reused=False)  # fmt: skip
    record = RunRecord(Outcome.PUBLISHED, gguf={"Q8_0": result})
    assert from_json(to_json(record)).gguf == {"Q8_0": result}
    assert from_json(to_json(RunRecord())).gguf == {}
    with pytest.raises(StateError, match="gguf holds a result that is not an object"):
        from_json('{"version": 2, "gguf": {"Q8_0": 3}}')


def test_the_config_accepts_exactly_the_types_the_converter_writes():
    from mergebot.gguf.convert import FILE_TYPES

    assert tuple(FILE_TYPES) == WRITTEN_TYPES
