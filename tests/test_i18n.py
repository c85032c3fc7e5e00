"""Every user-facing string has a zh-hans translation, compiled and in use."""

from __future__ import annotations

import ast
import gettext
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.utils import translation

BASE = Path(__file__).resolve().parent.parent
PO_FILES = sorted(BASE.glob("*/locale/zh_Hans/LC_MESSAGES/django.po"))


def po_entries(path: Path) -> list[tuple[str, str]]:
    """(msgid, first msgstr) pairs of a .po file, header excluded."""
    entries, msgid, msgstr, target = [], None, None, None
    for raw in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        line = raw.strip()
        if line.startswith("msgid "):
            msgid, target = ast.literal_eval(line[6:]), "id"
        elif line.startswith(("msgstr ", "msgstr[0] ")):
            msgstr, target = ast.literal_eval(line.split(" ", 1)[1]), "str"
        elif line.startswith(("msgid_plural", "msgstr[")):
            target = None
        elif line.startswith('"') and target:
            if target == "id":
                msgid += ast.literal_eval(line)
            else:
                msgstr += ast.literal_eval(line)
        elif not line and msgid is not None:
            if msgid:
                entries.append((msgid, msgstr or ""))
            msgid, msgstr, target = None, None, None
    return entries


def test_there_are_catalogs_for_every_app():
    assert {p.parts[-5] for p in PO_FILES} >= {"leasesite", "tokens", "leases"}


@pytest.mark.parametrize("po", PO_FILES, ids=lambda p: p.parts[-5])
def test_every_message_is_translated_and_compiled(po):
    entries = po_entries(po)
    assert entries
    untranslated = [msgid for msgid, msgstr in entries if not msgstr]
    assert not untranslated, f"untranslated in {po}: {untranslated}"
    with po.with_suffix(".mo").open("rb") as mo:
        compiled = gettext.GNUTranslations(mo)
    stale = [msgid for msgid, msgstr in entries if compiled.gettext(msgid) != msgstr and "%" not in msgid]
    assert not stale, f"{po.with_suffix('.mo')} is out of date (run compilemessages): {stale}"
    with translation.override("zh-hans"):
        for msgid, msgstr in entries:
            if "%" not in msgid:
                assert translation.gettext(msgid) == msgstr


@pytest.mark.django_db
def test_admin_speaks_chinese(client):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    client.force_login(user)
    # The environment decides the language, whatever the browser prefers.
    body = client.get("/admin/", HTTP_ACCEPT_LANGUAGE="en-US,en;q=0.9").content.decode()
    assert "报名工具 Token" in body and "刷新记录" in body


@pytest.mark.django_db
def test_language_follows_the_setting(client, settings):
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123456")
    client.force_login(user)
    settings.LANGUAGE_CODE = "en"
    body = client.get("/admin/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "Refresh runs" in body and "刷新记录" not in body
