"""The fake 报名工具 server of the demo and the benchmarks answers the keep-alive call the client
makes (the old tool's v3 call), like the real upstream does."""

from __future__ import annotations

import json
from urllib.request import urlopen

import pytest

from leasesite.fakes.baoming_server import FakeBaomingServer
from tests.conftest import new_token_value
from tokens.clients import BaomingClient, CheckOutcome


@pytest.fixture
def fake():
    with FakeBaomingServer(invalid_prefix="0") as server:
        yield server


def test_the_fake_answers_the_clients_call(fake):
    client = BaomingClient(base_url=fake.url, timeout=2)
    valid = client.check_token("a" + new_token_value()[1:])
    assert (valid.outcome, valid.message) == (CheckOutcome.VALID, "未找到已有报名记录")
    assert client.check_token("0" + new_token_value()[1:]).outcome == CheckOutcome.INVALID


def test_the_fake_refuses_the_old_guessed_call_and_a_call_without_its_parameters(fake):
    token = "a" + new_token_value()[1:]
    with pytest.raises(Exception) as old:
        urlopen(f"{fake.url}/xcx/enroll/v2/detail?access_token={token}", timeout=2)
    assert getattr(old.value, "code", None) == 404
    answer = json.load(urlopen(f"{fake.url}/xcx/enroll/v3/detail?access_token={token}", timeout=2))
    assert answer["sta"] != 0
