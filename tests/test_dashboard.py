"""The one dashboard client and token path: what a request carries, and how each failure reads (the error taxonomy)."""

from __future__ import annotations

import httpx
import pytest

from controller import errors
from controller.apply.dashboard import DashboardClient, DashboardError, ray_token, token_path

URL = "http://127.0.0.1:8265"


def client(answer, token: str | None = "s3cret") -> tuple[DashboardClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    return DashboardClient(URL + "/", token, transport=httpx.MockTransport(handle)), seen


def test_every_request_carries_the_token_as_a_bearer():
    dashboard, seen = client(lambda request: httpx.Response(200, json={"ok": True}))
    assert dashboard.request("GET", "/api/version").json() == {"ok": True}
    assert seen[0].headers["Authorization"] == "Bearer s3cret" and str(seen[0].url) == f"{URL}/api/version"


def test_no_token_sends_no_authorization_header():
    dashboard, seen = client(lambda request: httpx.Response(200), token=None)
    dashboard.send("GET", "/api/version")
    assert "Authorization" not in seen[0].headers


@pytest.mark.parametrize("case, answer, method, message", [
    ("unreachable", lambda request: (_ for _ in ()).throw(httpx.ConnectError("refused")), "send",
     f"Ray dashboard at {URL} unreachable (ConnectError); is Ray running?"),
    ("a refused token", lambda request: httpx.Response(401), "send",
     f"Ray dashboard at {URL} refused the auth token; set RAY_AUTH_MODE=token and the same token as the cluster"),
    ("an error answer where success is required", lambda request: httpx.Response(500, text="boom"), "request",
     "Ray dashboard PUT /api/serve/applications/ answered 500: boom"),
])
def test_failures_are_temporary_dashboard_errors_that_say_what_to_do(case, answer, method, message):
    dashboard, _ = client(answer)
    with pytest.raises(DashboardError) as raised:
        getattr(dashboard, method)("PUT", "/api/serve/applications/", json={})
    assert str(raised.value) == message
    assert isinstance(errors.classify(raised.value), errors.TemporaryError)  # the tick is retried with backoff
    assert "s3cret" not in str(raised.value)


def test_send_hands_back_any_other_status_for_the_caller_to_read():
    dashboard, _ = client(lambda request: httpx.Response(404, text="no such package"))
    assert dashboard.send("GET", "/api/packages/gcs/x.zip").status_code == 404


def test_alive_is_false_when_unreachable_or_refused_and_true_when_answered():
    assert client(lambda request: httpx.Response(200))[0].alive()
    assert not client(lambda request: httpx.Response(401))[0].alive()
    assert not client(lambda request: (_ for _ in ()).throw(httpx.ConnectError("refused")))[0].alive()


def test_the_token_comes_from_the_environment_then_the_path_variable_then_the_home_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert token_path() == tmp_path / ".ray" / "auth_token" and ray_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert ray_token() == "from-home"
    (tmp_path / "elsewhere").write_text(" from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert token_path() == tmp_path / "elsewhere" and ray_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_token() == "from-env"
