"""Stopping the servers the tests start on this machine."""

import os
import signal
import subprocess


def stop(proc: subprocess.Popen, *, grace: float = 15, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; `group`: the whole process group (a process started with
    start_new_session=True and its children)."""
    if proc.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(10)
