"""One queued run's process: ``python -m sdtrain.web.worker EXIT_FILE LOG_FILE -- COMMAND...``.

It runs ``COMMAND`` (``sdtrain train ...``) with its output in ``LOG_FILE``, passes SIGTERM / SIGUSR1 on to it (the run
checkpoints and exits 75), and writes the exit status to ``EXIT_FILE`` atomically when it ends. The server starts it
in a session of its own, so a run outlives a restart of the server, which finds its exit status in the file (a
process that is not its child cannot be waited for)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file renamed over it: a reader sees the old or the new text."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def main(argv: list[str]) -> int:
    exit_file, log_file, command = Path(argv[0]), Path(argv[1]), argv[argv.index("--") + 1 :]
    with open(log_file, "ab") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, lambda number, _frame: child.send_signal(number))
        code = child.wait()
    write_atomically(exit_file, json.dumps({"returncode": code, "ended": time.time()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
