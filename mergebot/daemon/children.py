"""Stopping a child process politely: SIGTERM, a grace period, then SIGKILL."""

import signal
import subprocess


def stop_process(process: subprocess.Popen | None, grace: float) -> None:
    """Ask the process to stop, wait up to `grace` seconds, then kill it; a finished process is left alone."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
