"""Config files: every table names an unknown or missing key with its file and line, and `mergebot merge` stays
light (it never loads the scheduler or transformers)."""

from pathlib import Path

import pytest

from mergebot.config.daemon import check_daemon_config
from mergebot.config.merge import load_merge_config
from mergebot.dev.synthetic import make_model
from tests.helpers import run_cli_process

DAEMON = '[daemon]\nstate_dir = "state"\n'
TARGET = '[[targets]]\nname = "t"\nrepo = "me/t"\nmerge_method = "karcher"\n'
MODELS = 'models = [{ model = "org/a" }, { model = "org/b" }]\n'
WEBHOOK = '[daemon.webhook]\nlisten = "127.0.0.1:8765"\n'
SOURCE = "model = 'org/a', layer_range = [0, 2]"

DAEMON_KNOWN = (
    "debounce, executor, hub_endpoint, max_concurrent_merges, max_retries, merge_timeout, metrics_listen, "
    "poll_interval, ray, read_endpoint, read_token_env, retry_delay, schedule, state_dir, status_page, stop_grace, "
    "webhook"
)
# For each table: a config with one unknown key, the key's line and path, and the keys the error lists.
UNKNOWN_KEYS = {
    "daemon": (f"{DAEMON}pol_interval = '5m'\n", 3, "daemon.pol_interval", DAEMON_KNOWN),
    "webhook": (f'{DAEMON}{WEBHOOK}secret = "x"\n', 5, "daemon.webhook.secret", "listen, secret_env"),
    "validate": (
        f"{DAEMON}{TARGET}{MODELS}validate = {{ max_ratio = 2 }}\n",
        8,
        "targets[0].validate.max_ratio",
        "accept_config_fields, eval_text, max_input_jump, max_kl, max_parent_ratio, max_ppl_ratio, max_regression, "
        "max_weight_outlier, min_eot_ratio, min_stop_ratio, probe_prompts",
    ),
    "models": (
        f'{DAEMON}{TARGET}models = [\n  {{ model = "org/a" }},\n  {{ model = "org/b", revison = "v1" }},\n]\n',
        9,
        "targets[0].models[1].revison",
        "model, parameters, revision",
    ),
    "slices": (
        f"{DAEMON}{TARGET}slices = [{{ sources = [{{ {SOURCE} }}], weight = 1 }}]\n",
        7,
        "targets[0].slices[0].weight",
        "sources",
    ),
    "slice-source": (
        f"{DAEMON}{TARGET}slices = [{{ sources = [{{ {SOURCE}, paramters = {{}} }}] }}]\n",
        7,
        "targets[0].slices[0].sources[0].paramters",
        "layer_range, model, parameters, revision",
    ),
    "condition": (
        f"{DAEMON}{TARGET}{MODELS}parameters = {{ weight = [{{ filtr = 'mlp', value = 1 }}] }}\n",
        8,
        "targets[0].parameters.weight[0].filtr",
        "filter, value",
    ),
    "top-level": (f"{DAEMON}[[target]]\nname = 't'\n", 3, "target", "daemon, notify, targets"),
}


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "mergebot.toml"
    path.write_text(text)
    _, found = check_daemon_config(path)
    return [str(problem) for problem in found]


def test_webhook_without_listen_is_one_line_with_exit_code_2(tmp_path):
    config = tmp_path / "mergebot.toml"
    config.write_text(f'{DAEMON}[daemon.webhook]\nsecret_env = "HOOK_SECRET"\n')
    result = run_cli_process("check-config", "--config", config)
    assert result.returncode == 2
    assert result.stderr.startswith(f"mergebot: error: {config}:3: daemon.webhook.listen: required")
    assert result.stderr.strip().count("\n") == 0


MEANT = {
    "daemon": "poll_interval",
    "webhook": "secret_env",
    "validate": "max_ppl_ratio",
    "models": "revision",
    "slices": None,
    "slice-source": "parameters",
    "condition": "filter",
    "top-level": "targets",
}
"""The known key closest to each misspelt one, if any is close."""


@pytest.mark.parametrize("table", UNKNOWN_KEYS)
def test_unknown_key_is_named_with_its_line(tmp_path, table):
    text, line, key, known = UNKNOWN_KEYS[table]
    meant = f"; did you mean {MEANT[table]!r}?" if MEANT[table] else ""
    assert problems(tmp_path, text) == [f"{tmp_path}/mergebot.toml:{line}: {key}: unknown key (known: {known}){meant}"]


def test_missing_key_points_at_its_table(tmp_path):
    text = f'{DAEMON}{TARGET}{MODELS}\n[[targets]]\nname = "u"\nmerge_method = "linear"\n{MODELS}'
    assert problems(tmp_path, text) == [
        f"{tmp_path}/mergebot.toml:9: targets[1].repo: required: the Hub repo to publish to, as org/name"
    ]


def imports_of_merge(tmp_path, method: str, *sources: str) -> set[str]:
    result = run_cli_process(
        "merge", "--method", method, *sources, tmp_path / "out", env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "out").glob("*.safetensors"))
    return {line.rpartition("|")[2].strip() for line in result.stderr.splitlines() if line.startswith("import time")}


def test_a_fused_merge_loads_neither_torch_nor_the_scheduler_nor_transformers(tmp_path):
    """A merge whose tensors all take the fused loops skips torch's import (over a second of a small merge)."""
    base = make_model(tmp_path / "base")
    other = make_model(tmp_path / "other", base=base, seed=1)
    imported = imports_of_merge(tmp_path, "linear", f"{base}:1", f"{other}:1")
    assert "numba" in imported
    assert not {"torch", "apscheduler", "transformers"} & imported


def test_a_method_without_fused_loops_loads_torch_but_not_transformers(tmp_path):
    base = make_model(tmp_path / "base")
    other = make_model(tmp_path / "other", base=base, seed=1)
    imported = imports_of_merge(tmp_path, "arcee_fusion", "--base-model", str(base), str(other))
    assert "torch" in imported
    assert not {"apscheduler", "transformers"} & imported


def test_mergekit_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    """PyYAML reads `1e-8` as a string (YAML 1.1); mergekit configs write it that way, so it must be a number."""
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: multislerp\nmodels: [{model: org/a}, {model: org/b}]\nparameters: {eps: 1e-8, weight: 1}\n"
    )
    assert load_merge_config(config).parameters["eps"] == 1e-8


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("accept_config_fields = 'rope_theta'", "targets[0].validate.accept_config_fields: must be a list of config"),
        ("accept_config_fields = ['']", "targets[0].validate.accept_config_fields: must be a list of config"),
        ("min_stop_ratio = 1.5", "targets[0].validate.min_stop_ratio: must be a number from 0 to 1"),
        ("probe_prompts = 'missing.json'", "targets[0].validate.probe_prompts: "),
    ],
)
def test_behaviour_settings_are_checked_with_their_line(tmp_path, setting, message):
    found = problems(tmp_path, f"{DAEMON}{TARGET}{MODELS}validate = {{ {setting} }}\n")
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'mergebot.toml'}:8: {message}"), found


def test_accepted_config_fields_reach_the_settings(tmp_path):
    path = tmp_path / "mergebot.toml"
    path.write_text(
        f"{DAEMON}{TARGET}{MODELS}validate = {{ accept_config_fields = ['rope_theta'], min_stop_ratio = 0.3 }}\n"
    )
    config, found = check_daemon_config(path)
    assert not found
    settings = config.targets["t"].validate
    assert settings.accept_config_fields == ("rope_theta",) and settings.min_stop_ratio == 0.3
