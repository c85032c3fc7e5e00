"""Run many ``manage.py`` command lines as real processes without paying Django's start-up for
each: one driver process sets Django up once, then forks a child per command line. Each child is
a real process with its own stdin, stdout, stderr, exit code and database connection, running
``execute_from_command_line`` exactly as ``manage.py`` does.

Usage (by the tests): ``python -m tests.faults._h6_commands CASES.json RESULTS.json``; each case is
``{"argv": [...], "stdin": "<base64>"}``; each result ``{"code": int, "stdout": str, "stderr": str}``.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile


def main() -> None:
    cases_path, results_path = sys.argv[1], sys.argv[2]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "leasesite.settings")
    import django

    django.setup()
    from django.core.management import execute_from_command_line
    from django.db import connections

    with open(cases_path) as handle:
        cases = json.loads(handle.read())
    results = []
    for case in cases:
        connections.close_all()  # the child opens its own
        files = [tempfile.TemporaryFile() for _ in range(3)]  # noqa: SIM115 - closed below
        files[0].write(base64.b64decode(case.get("stdin", "")))
        files[0].seek(0)
        pid = os.fork()
        if pid == 0:  # the child: manage.py with this command line
            for fd, handle in enumerate(files):
                os.dup2(handle.fileno(), fd)
            sys.stdin = open(0, closefd=False)  # noqa: SIM115
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            code = 0
            try:
                execute_from_command_line(["manage.py", *case["argv"]])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - what an uncaught error does to manage.py
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _pid, status = os.waitpid(pid, 0)
        out = []
        for handle in files[1:]:
            handle.seek(0)
            out.append(handle.read().decode("utf-8", "replace"))
        results.append({"code": os.waitstatus_to_exitcode(status), "stdout": out[0], "stderr": out[1]})
    with open(results_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
