"""systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING), when the service manager asks for it."""

import os
import socket


def notify(message: str) -> None:
    """Send `message` to NOTIFY_SOCKET; a no-op when it is not set (not under systemd, or Type= is not notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def watchdog_interval() -> float:
    """How often to send WATCHDOG=1 (half of WatchdogSec, as systemd recommends); 0 when there is no watchdog."""
    return int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
