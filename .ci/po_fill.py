"""Fill a .po file's untranslated (or fuzzy) entries from a JSON object {msgid: msgstr}.

A developer's tool, run after ``makemessages``:

    python .ci/po_fill.py APP/locale/zh_Hans/LC_MESSAGES/django.po translations.json

then ``compilemessages``. Entries ``makemessages`` marked fuzzy (a guess from a similar message)
lose the guess: they take the JSON's text or become untranslated, so a wrong guess never ships.
Plural entries get the same text in every msgstr[n] (Chinese has one form). Prints what is still
untranslated and exits 1 if anything is.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path


def _strings(lines: list[str], i: int) -> tuple[str, int]:
    text = ast.literal_eval(lines[i].split(" ", 1)[1])
    i += 1
    while i < len(lines) and lines[i].startswith('"'):
        text += ast.literal_eval(lines[i])
        i += 1
    return text, i


def main(po_path: str, json_path: str) -> int:
    mapping: dict[str, str] = json.loads(Path(json_path).read_text(encoding="utf-8")) if json_path else {}
    blocks = Path(po_path).read_text(encoding="utf-8").split("\n\n")
    out, missing = [], []
    for block in blocks:
        lines = block.splitlines()
        if not any(line.startswith("msgid ") for line in lines):
            out.append(block)
            continue
        fuzzy = any(line.startswith("#,") and "fuzzy" in line for line in lines)
        comments = []
        for line in lines:
            if not line.startswith("#") or line.startswith("#|"):
                continue  # "#|" holds the previous msgid of a fuzzy guess
            if line.startswith("#,"):
                flags = [f.strip() for f in line[2:].split(",") if f.strip() and f.strip() != "fuzzy"]
                if not flags:
                    continue
                line = "#, " + ", ".join(flags)
            comments.append(line)
        i = next(n for n, line in enumerate(lines) if line.startswith("msgid "))
        msgid, i = _strings(lines, i)
        plural = None
        if i < len(lines) and lines[i].startswith("msgid_plural"):
            plural, i = _strings(lines, i)
        strs: list[tuple[str, str]] = []
        while i < len(lines) and lines[i].startswith("msgstr"):
            head = lines[i].split(" ", 1)[0]
            text, i = _strings(lines, i)
            strs.append((head, "" if fuzzy else text))
        if not msgid or (not fuzzy and all(text for _head, text in strs)):
            out.append(block)  # the header, or already translated: kept byte for byte
            continue
        new = [*comments, f"msgid {json.dumps(msgid, ensure_ascii=False)}"]
        if plural is not None:
            new.append(f"msgid_plural {json.dumps(plural, ensure_ascii=False)}")
        for head, text in strs:
            if not text and msgid in mapping:
                text = mapping[msgid]
            if not text and msgid:
                missing.append(msgid)
            new.append(f"{head} {json.dumps(text, ensure_ascii=False)}")
        out.append("\n".join(new))
    Path(po_path).write_text("\n\n".join(out).rstrip("\n") + "\n", encoding="utf-8")
    for msgid in dict.fromkeys(missing):
        print(f"untranslated: {msgid!r}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
