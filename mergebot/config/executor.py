"""Where the daemon runs its merges: `executor = "local"` (a child process beside the daemon, the default) or
`"ray"` (a task on an existing Ray cluster, set up in the `[daemon.ray]` table).

Ray reserves CPUs and memory for a task when it places it; it has no disk resource, so `disk` is checked on the
worker instead: a run starts only where the work directory has that much free space.
"""

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from mergebot.config.document import Located, parse_size

EXECUTORS = ("local", "ray")
RAY_KEYS = {"address", "num_cpus", "memory", "disk", "work_dir"}
CLUSTER = "the Ray cluster, like 'HOST:6379' or 'ray://HOST:10001'"


@dataclass(frozen=True)
class RaySettings:
    """How each run is placed on the cluster. Read when the daemon starts; a reload does not change them."""

    address: str
    """What `ray.init` connects to: 'HOST:6379' (the head's GCS) or 'ray://HOST:10001' (Ray Client)."""
    num_cpus: float = 1.0
    """Reserved per run; Ray also sets OMP_NUM_THREADS from it, so torch uses that many threads."""
    memory: int | None = None
    """Bytes reserved per run (Ray's scheduling reservation, not a limit); None reserves none."""
    disk: int | None = None
    """Free bytes the work directory on the worker must have for a run to start there; None checks nothing."""
    work_dir: str | None = None
    """A path on the workers where merges are made and kept between runs; None: the worker's temp dir."""


def executor_settings(raw: dict[str, Any], located: Located) -> RaySettings | None:
    """The `executor` key and the `[daemon.ray]` table of `[daemon]`: the Ray settings, or None to run locally."""
    executor = raw.get("executor", "local")
    if executor not in EXECUTORS:
        raise located.error("daemon.executor", f"{executor!r} is not one of {', '.join(map(repr, EXECUTORS))}")
    table = raw.get("ray")
    if executor == "local":
        if table is not None:
            raise located.error("daemon.ray", "only read with executor = 'ray' (the default is 'local')")
        return None
    if table is None:
        raise located.error("daemon.executor", f"'ray' needs a [daemon.ray] table with address = {CLUSTER}")
    if not isinstance(table, dict):
        raise located.error("daemon.ray", "must be a table: [daemon.ray] with address and the resources per run")
    located.check_keys(table, RAY_KEYS, "daemon.ray.")
    address = table.get("address")
    if not isinstance(address, str) or not address.strip():
        raise located.error("daemon.ray.address", f"required with executor = 'ray': {CLUSTER}")
    settings: dict[str, Any] = {"address": address.strip()}
    if "num_cpus" in table:
        value = table["num_cpus"]
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise located.error("daemon.ray.num_cpus", "must be a number above 0 (CPUs reserved per run)")
        settings["num_cpus"] = float(value)
    for key in ("memory", "disk"):
        if key in table:
            settings[key] = parse_size(table[key], f"daemon.ray.{key}", located)
    if "work_dir" in table:
        work_dir = table["work_dir"]
        if not isinstance(work_dir, str) or not PurePosixPath(work_dir).is_absolute():
            raise located.error("daemon.ray.work_dir", "must be an absolute path on the workers")
        settings["work_dir"] = work_dir
    return RaySettings(**settings)
