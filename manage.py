#!/usr/bin/env python3
"""Django's command-line utility for administrative tasks.

``python3 manage.py start`` also works on a machine that has nothing but Python 3.11: it creates
``.venv`` with the pinned requirements first and then runs itself inside it.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
VENV_DIR = BASE_DIR / ".venv"


def _venv_python() -> Path:
    return VENV_DIR / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _bootstrap_venv_and_reexec() -> None:
    """Create/refresh .venv from requirements/base.txt (+prod.txt) and re-run this command in it."""
    requirements = [BASE_DIR / "requirements" / "base.txt", BASE_DIR / "requirements" / "prod.txt"]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in requirements)).hexdigest()
    stamp = VENV_DIR / ".requirements.sha256"
    if not _venv_python().exists():
        print(f"creating virtual environment in {VENV_DIR} ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV_DIR)])
    if not stamp.exists() or stamp.read_text().strip() != digest:
        print("installing pinned requirements (first run only) ...", flush=True)
        pip = [str(_venv_python()), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.check_call([*pip, "install", "--upgrade", "pip"])
        subprocess.check_call([*pip, "install", *(arg for path in requirements for arg in ("-r", str(path)))])
        stamp.write_text(digest)
    os.execv(str(_venv_python()), [str(_venv_python()), str(BASE_DIR / "manage.py"), *sys.argv[1:]])


def main() -> None:
    in_venv = Path(sys.prefix).resolve() == VENV_DIR.resolve()
    if len(sys.argv) > 1 and sys.argv[1] == "start" and not in_venv and not os.environ.get("LEASESITE_NO_VENV"):
        _bootstrap_venv_and_reexec()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "leasesite.settings")
    try:
        from django.core.management import execute_from_command_line
    except ImportError as exc:
        raise SystemExit(
            "Django is not installed here. Run `python3 manage.py start` once (it creates .venv), "
            "then use .venv/bin/python manage.py ..."
        ) from exc
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
