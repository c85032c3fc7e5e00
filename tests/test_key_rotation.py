"""Encryption-key rotation covers every encrypted column of every model (tokens and team API
tokens), and a secret that no configured key opens breaks only the code that needs its plaintext.

Keys are switched with the ``settings`` fixture exactly as an operator switches
``TOKEN_ENCRYPTION_KEYS``; ciphertext written with a foreign key goes straight into the column.
"""

from __future__ import annotations

import io
import secrets
import uuid

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import TestCase
from django.urls import reverse
from django.utils import translation
from django.utils.html import escape
from django.utils.translation import gettext

from leases.models import LeaseStatus, MemberLease, Team, TeamHealth
from leases.providers import TransientProviderError, provider_for
from leases.services.sync import joins_sync
from leasesite.crypto import fingerprint_secret
from tests.lease_fixtures import TEAM_TOKEN
from tokens.models import BaomingToken

pytestmark = pytest.mark.django_db


def raw(table: str, column: str, pk: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table} WHERE id = %s", [pk])
        return cursor.fetchone()[0]


def write_raw(table: str, column: str, pk: int, value: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET {column} = %s WHERE id = %s", [value, pk])


def foreign_ciphertext(plaintext: str) -> str:
    """Ciphertext of a key that is not (any more) in TOKEN_ENCRYPTION_KEYS."""
    return Fernet(Fernet.generate_key()).encrypt(plaintext.encode()).decode()


def rotate(**options: object) -> str:
    out = io.StringIO()
    call_command("rotate_token_keys", stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue()


def prepend_new_key(settings) -> str:
    """Step 1 of the README's procedure: a new first key, the old one kept behind it."""
    key = Fernet.generate_key().decode()
    settings.TOKEN_ENCRYPTION_KEYS = [key, *settings.TOKEN_ENCRYPTION_KEYS]
    return key


@pytest.fixture
def rotated(settings, make_token, make_team) -> dict[str, object]:
    """Tokens and teams stored with the old key, rotated, and the old key dropped."""
    tokens = [make_token() for _ in range(3)]
    alpha = make_team("alpha")
    beta = make_team("beta", provider="memory", api_token="")  # a team without a token
    new_key = prepend_new_key(settings)
    output = rotate()
    settings.TOKEN_ENCRYPTION_KEYS = [new_key]
    return {"tokens": tokens, "alpha": alpha, "beta": beta, "output": output, "new_key": new_key}


# -- rotation ------------------------------------------------------------------------------------------
def test_encrypted_columns_are_found_by_walking_the_models():
    from leasesite.keys import encrypted_columns

    assert {(column.label, column.fingerprints) for column in encrypted_columns()} == {
        ("tokens.BaomingToken.token", ("fingerprint",)),
        ("tokens.QrLogin.code", ()),
        ("leases.Team.api_token", ()),
    }


def test_rotation_reencrypts_tokens_and_team_tokens_so_the_old_key_can_go(rotated):
    assert "tokens.BaomingToken.token: re-encrypted 3, already current 0" in rotated["output"]
    assert "leases.Team.api_token: re-encrypted 2, already current 0" in rotated["output"]

    new = Fernet(rotated["new_key"].encode())
    for token in rotated["tokens"]:
        stored = BaomingToken.objects.get(pk=token.pk)  # only the new key is configured now
        assert stored.token == token.token
        assert stored.fingerprint == fingerprint_secret(token.token)
        assert new.decrypt(raw("tokens_baomingtoken", "token", token.pk).encode()).decode() == token.token
    assert Team.objects.get(name="alpha").api_token == TEAM_TOKEN
    assert Team.objects.get(name="beta").api_token == ""
    assert new.decrypt(raw("leases_team", "api_token", rotated["alpha"].pk).encode()).decode() == TEAM_TOKEN

    again = rotate()
    assert "tokens.BaomingToken.token: re-encrypted 0, already current 3" in again
    assert "leases.Team.api_token: re-encrypted 0, already current 2" in again


def test_redeem_admin_metrics_and_sync_work_after_rotation(
    rotated, client, admin_client, make_code, settings, eager_tasks
):
    settings.METRICS_TOKEN = "rotation-metrics"
    code = make_code()
    with TestCase.captureOnCommitCallbacks(execute=True):  # the invite task, as a worker runs it
        response = client.post(
            "/redeem/",
            {"code": code.code, "email": "after-rotation@example.com"},
            REMOTE_ADDR=f"10.99.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}",
        )
    assert response.status_code == 302
    lease = MemberLease.objects.get(email="after-rotation@example.com")
    assert lease.status == LeaseStatus.PENDING and lease.invited_at is not None  # the provider took the token

    assert admin_client.get(reverse("admin:leases_team_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:leases_team_change", args=[rotated["alpha"].pk])).status_code == 200
    assert admin_client.get(reverse("admin:tokens_baomingtoken_changelist")).status_code == 200
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer rotation-metrics").status_code == 200
    assert all(result.ok for result in joins_sync())


def test_rotation_skips_empty_columns(settings, make_team):
    team = make_team("alpha")
    write_raw("leases_team", "api_token", team.pk, "")  # an empty column, not ciphertext of ""
    prepend_new_key(settings)
    output = rotate()
    assert "leases.Team.api_token: re-encrypted 0, already current 0, empty 1" in output
    assert raw("leases_team", "api_token", team.pk) == ""
    assert Team.objects.get(pk=team.pk).api_token == ""


def test_rotation_stops_at_an_undecryptable_row_and_writes_nothing_of_its_chunk(settings, make_team):
    teams = [make_team(f"team-{n}") for n in range(5)]
    write_raw("leases_team", "api_token", teams[3].pk, foreign_ciphertext("lost"))
    prepend_new_key(settings)
    before = {team.pk: raw("leases_team", "api_token", team.pk) for team in teams}

    with pytest.raises(CommandError) as raised:
        rotate(chunk_size=2)  # chunks: teams 0-1, 2-3, 4

    message = str(raised.value)
    assert "leases.Team.api_token" in message and f"id {teams[3].pk}" in message
    assert "keep the old key" in message
    after = {team.pk: raw("leases_team", "api_token", team.pk) for team in teams}
    assert after[teams[0].pk] != before[teams[0].pk] and after[teams[1].pk] != before[teams[1].pk]  # done
    assert after[teams[2].pk] == before[teams[2].pk]  # same chunk as the bad row: untouched
    assert after[teams[3].pk] == before[teams[3].pk]
    assert after[teams[4].pk] == before[teams[4].pk]  # never reached
    assert "lost" not in message


# -- a secret that cannot be decrypted -------------------------------------------------------------------
@pytest.fixture
def lost_team(make_team) -> Team:
    """A team whose API token was encrypted with a key that is no longer configured."""
    team = make_team("lost")
    write_raw("leases_team", "api_token", team.pk, foreign_ciphertext(TEAM_TOKEN))
    return team


def test_team_admin_and_metrics_answer_when_a_team_token_cannot_be_decrypted(lost_team, client, admin_client, settings):
    settings.METRICS_TOKEN = "rotation-metrics"
    listing = admin_client.get(reverse("admin:leases_team_changelist"))
    assert listing.status_code == 200 and "lost" in listing.content.decode()
    page = admin_client.get(reverse("admin:leases_team_change", args=[lost_team.pk]))
    assert page.status_code == 200
    assert TEAM_TOKEN not in page.content.decode()
    with translation.override("zh-hans"):
        assert escape(gettext("(cannot be decrypted)")) in page.content.decode()  # the masked token says so
    metrics = client.get("/metrics", HTTP_AUTHORIZATION="Bearer rotation-metrics")
    assert metrics.status_code == 200
    assert 'leasesite_team_seats{kind="capacity",team="lost"}' in metrics.content.decode()


def test_saving_a_team_whose_token_cannot_be_decrypted_keeps_its_ciphertext(lost_team, admin_client):
    ciphertext = raw("leases_team", "api_token", lost_team.pk)
    response = admin_client.post(
        reverse("admin:leases_team_change", args=[lost_team.pk]),
        {
            "name": "lost",
            "provider": "http",
            "api_base": lost_team.api_base,
            "api_token": "",  # "leave empty to keep the current token"
            "capacity": "3",
            "is_active": "on",
            "expires_at_0": "",
            "expires_at_1": "",
            "events-TOTAL_FORMS": "0",  # the read-only history inline
            "events-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    assert Team.objects.values_list("capacity", flat=True).get(pk=lost_team.pk) == 3
    assert raw("leases_team", "api_token", lost_team.pk) == ciphertext  # still there for the old key


def test_a_provider_call_needing_an_undecryptable_token_fails_clearly(lost_team):
    team = Team.objects.get(pk=lost_team.pk)
    with pytest.raises(TransientProviderError, match="cannot be decrypted") as raised:
        provider_for(team).list_members()
    assert TEAM_TOKEN not in str(raised.value)
    assert raw("leases_team", "api_token", team.pk) not in str(raised.value)

    (result,) = joins_sync(team_id=team.pk)  # the sync reports it instead of crashing
    assert not result.ok and "cannot be decrypted" in result.error
    assert Team.objects.get(pk=team.pk).health == TeamHealth.DEGRADED  # not dead: nothing is evacuated


def test_redeem_with_an_undecryptable_team_token_creates_the_lease_and_reports_the_invite(
    lost_team, client, make_code, eager_tasks
):
    code = make_code()
    with TestCase.captureOnCommitCallbacks(execute=True):  # the invite task, as a worker runs it
        response = client.post(
            "/redeem/",
            {"code": code.code, "email": f"{uuid.uuid4().hex[:8]}@example.com"},
            REMOTE_ADDR=f"10.98.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}",
        )
    assert response.status_code == 302
    lease = MemberLease.objects.get()
    assert lease.invited_at is None and "cannot be decrypted" in lease.last_error  # the join sync retries


def test_a_token_that_cannot_be_decrypted_keeps_its_ciphertext_and_fingerprint_when_saved(make_token, admin_client):
    token = make_token()
    ciphertext = foreign_ciphertext(token.token)
    write_raw("tokens_baomingtoken", "token", token.pk, ciphertext)
    stored = BaomingToken.objects.get(pk=token.pk)
    assert not stored.token  # nothing usable
    stored.last_error = "checked"
    stored.save()
    assert raw("tokens_baomingtoken", "token", token.pk) == ciphertext
    assert raw("tokens_baomingtoken", "fingerprint", token.pk) == fingerprint_secret(token.token)
    assert admin_client.get(reverse("admin:tokens_baomingtoken_changelist")).status_code == 200
