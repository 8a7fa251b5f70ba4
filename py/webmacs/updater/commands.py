"""External programs the updater runs (docker, an admin's apply command), each with a deadline and a log line."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("webmacs.updater")
_SUBCOMMAND = re.compile(r"^[a-z][a-z-]*$")


@dataclass(frozen=True)
class Commands:
    timeout_s: float

    def run(
        self, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `args`; a program that cannot start or overruns the deadline is a failed run (127, 124 as a
        shell would say), never an exception: every outcome is something to record and roll back from."""
        log.info("running: %s", shlex.join(args))
        try:
            return subprocess.run(
                args, capture_output=True, text=True, env=env, cwd=cwd, timeout=self.timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(args, 124, "", f"no result within {self.timeout_s:g} s")
        except OSError as e:
            return subprocess.CompletedProcess(args, 127, "", e.strerror or str(e))


def failure(r: subprocess.CompletedProcess[str]) -> str:
    """One line saying which command failed ("docker compose up": the program and its sub-commands, without
    options and paths) and its last words."""
    lines = (r.stderr or r.stdout or "").strip().splitlines()
    args = [str(a) for a in r.args] if isinstance(r.args, list) else [str(r.args)]
    words = [Path(args[0]).name, *(a for a in args[1:] if _SUBCOMMAND.match(a))]
    return f"'{' '.join(words[:3])}' exited with {r.returncode}" + (f": {lines[-1][:200]}" if lines else "")
