"""The Celery application, configured from Django settings (``CELERY_`` namespace)."""

from __future__ import annotations

import logging
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "leasesite.settings")

if os.environ.get("LEASESITE_SUPERVISED") == "1" and (
    os.environ.get("CELERY_BROKER_URL") or "filesystem://"
).startswith("filesystem://"):
    # Under ``start``: kombu's "No hostname was supplied" is meaningless for the embedded broker.
    # On the logger itself (not a handler), so Django's LOGGING and Celery's setup leave it in place.
    from leasesite.log_filters import StartupNoiseFilter

    logging.getLogger("kombu.connection").addFilter(StartupNoiseFilter())

app = Celery("leasesite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_configure.connect
def _prepare_embedded_broker(sender: Celery, **kwargs: object) -> None:
    """The filesystem broker needs its folders before the first message."""
    from django.conf import settings

    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {})
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        folder = options.get(key)
        if folder:
            os.makedirs(folder, exist_ok=True)


@app.on_after_finalize.connect
def _record_job_successes(sender: Celery, **kwargs: object) -> None:
    from celery.signals import task_success

    from leasesite.jobs import job_success_on_task_success

    task_success.connect(job_success_on_task_success, weak=False)
