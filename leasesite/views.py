from __future__ import annotations

import hmac
from pathlib import Path

import redis
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from leasesite.metrics import metrics_render
from leasesite.redis_client import get_redis


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness and readiness: 200 when the database (and Redis, if configured) answer."""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except DatabaseError:
        checks["database"] = "error"
    if settings.REDIS_URL:
        try:
            get_redis().ping()
            checks["redis"] = "ok"
        except (redis.RedisError, OSError):
            checks["redis"] = "error"
    healthy = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if healthy else "error", **checks}, status=200 if healthy else 503)


def metrics_allowed(request: HttpRequest) -> bool:
    """``METRICS_TOKEN`` set: the bearer token must match; unset: only a development server answers."""
    expected = settings.METRICS_TOKEN
    if not expected:
        return settings.DEBUG
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if not metrics_allowed(request):
        if settings.METRICS_TOKEN:
            response = HttpResponse(
                "metrics: a valid bearer token is required\n", status=401, content_type="text/plain"
            )
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        return HttpResponse(
            "metrics: set METRICS_TOKEN to read /metrics in production\n", status=403, content_type="text/plain"
        )
    return HttpResponse(metrics_render(), content_type=CONTENT_TYPE_LATEST)


FAVICON = (Path(__file__).resolve().parent / "static" / "leasesite" / "favicon.svg").read_bytes()


@require_GET
@cache_control(max_age=86400, public=True)
def favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask for /favicon.ico whatever the page says; served from memory, no static setup needed."""
    return HttpResponse(FAVICON, content_type="image/svg+xml")


def login_locked(request: HttpRequest, original_response: HttpResponse | None = None, credentials: dict | None = None):
    """django-axes' lockout answer: a translated page in the console's frame, 429."""
    context = {
        "failure_limit": settings.AXES_FAILURE_LIMIT,
        "cooloff_minutes": int(settings.AXES_COOLOFF_TIME.total_seconds() // 60),
    }
    return render(request, "leasesite/lockout.html", context, status=429)
