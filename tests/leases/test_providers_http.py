"""The http provider against real local HTTP servers: the fake provider, and pytest-httpserver for
answers the fake never gives (malformed JSON, timeouts)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from pytest_httpserver import HTTPServer
from werkzeug.wrappers import Response

from leases.providers import PermanentProviderError, TransientProviderError
from leases.providers.http import HttpTeamProvider
from tests.leases.conftest import TEAM_TOKEN


@pytest.fixture
def team_api(provider):
    return HttpTeamProvider(api_base=provider.team_url("alpha"), api_token=TEAM_TOKEN)


def test_paged_listings_read_everything(provider, team_api, settings):
    settings.LEASE_PROVIDER_PAGE_SIZE = 7
    team_api.page_size = 7
    fake = provider.state.team("alpha")
    for n in range(23):
        fake.add_member(f"Member{n}@Example.com", joined_at=datetime(2026, 1, 1, tzinfo=UTC))
    for n in range(5):
        fake.invite(f"invitee{n}@example.com")
    members = team_api.list_members()
    invites = team_api.list_invites()
    assert len(members) == 23 and len({m.id for m in members}) == 23
    assert all(m.email == m.email.lower() for m in members)  # emails compare case-insensitively
    assert members[0].joined_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert {i.email for i in invites} == {f"invitee{n}@example.com" for n in range(5)}
    assert team_api.calls == 4 + 1  # ceil(23 / 7) pages of members, one of invites
    assert provider.state.calls(team="alpha", method="GET") == 5


def test_invite_409_and_delete_404_count_as_done(provider, team_api):
    fake = provider.state.team("alpha")
    team_api.invite("a@example.com")
    team_api.invite("a@example.com")  # 409: already invited
    member_id = fake.add_member("b@example.com")
    team_api.invite("b@example.com")  # 409: already a member
    team_api.remove_member(member_id)
    team_api.remove_member(member_id)  # 404: not a member any more
    team_api.cancel_invite("a@example.com")
    team_api.cancel_invite("a@example.com")  # 404
    assert fake.invite_posts == ["a@example.com", "a@example.com", "b@example.com"]
    assert fake.member_emails() == set() and fake.invited_emails() == set()


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_429_and_5xx_are_transient(provider, team_api, status):
    provider.state.team("alpha").fail_next.append(TransientProviderError("x", status=status))
    with pytest.raises(TransientProviderError, match=str(status)):
        team_api.list_members()


def test_wrong_token_is_permanent(provider):
    api = HttpTeamProvider(api_base=provider.team_url("alpha"), api_token="wrong")
    with pytest.raises(PermanentProviderError, match="401") as excinfo:
        api.invite("a@example.com")
    assert "wrong" not in str(excinfo.value)  # the credential never appears in errors
    assert excinfo.value.transient is False


def test_connection_refused_is_transient():
    api = HttpTeamProvider(api_base="http://127.0.0.1:9/teams/x/", api_token="t")
    with pytest.raises(TransientProviderError, match="connection error"):
        api.list_members()


@pytest.fixture
def odd_server():
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    server.stop()


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        json.dumps([1, 2]),
        json.dumps({"items": "nope", "total": 1}),
        json.dumps({"items": [{"id": "1"}], "total": 1}),  # no email
        json.dumps({"items": [{"email": "a@x.io"}], "total": 1}),  # no id
        json.dumps({"items": [], "total": "3"}),
        json.dumps({"items": [{"id": "1", "email": "a@x.io", "joined_at": "yesterday"}], "total": 1}),
    ],
)
def test_malformed_answers_are_transient(odd_server, body):
    odd_server.expect_request("/t/members").respond_with_data(body, content_type="application/json")
    api = HttpTeamProvider(api_base=odd_server.url_for("/t/"), api_token="t")
    with pytest.raises(TransientProviderError, match="malformed"):
        api.list_members()


def test_timeout_is_transient(odd_server):
    def slow(request):
        time.sleep(1.5)
        return Response("{}", content_type="application/json")

    odd_server.expect_request("/t/invites", method="POST").respond_with_handler(slow)
    api = HttpTeamProvider(api_base=odd_server.url_for("/t/"), api_token="t", timeout=0.3)
    with pytest.raises(TransientProviderError, match="timed out"):
        api.invite("a@example.com")


def test_sends_bearer_token_and_json(odd_server):
    odd_server.expect_request(
        "/t/invites", method="POST", headers={"Authorization": "Bearer s3cret"}, json={"email": "a@x.io"}
    ).respond_with_data("", status=201)
    HttpTeamProvider(api_base=odd_server.url_for("/t"), api_token="s3cret").invite("a@x.io")
    odd_server.check_assertions()


def test_a_total_that_never_ends_stops(odd_server, monkeypatch):
    import leases.providers.http as http_module

    monkeypatch.setattr(http_module, "MAX_PAGES", 3)
    odd_server.expect_request("/t/invites").respond_with_json(
        {"items": [{"email": "a@x.io", "invited_at": None}], "total": 10**9}
    )
    with pytest.raises(TransientProviderError, match="pages"):
        HttpTeamProvider(api_base=odd_server.url_for("/t/"), api_token="t").list_invites()
