from django.db import models
from django.utils.translation import gettext_lazy as _


class JobLock(models.Model):
    """A named lease on a periodic job, visible to every process through the database.

    Held by one owner until ``expires_at``; an owner that dies stops renewing it and the lock
    frees itself. See ``leasesite.locks``.
    """

    name = models.CharField(_("name"), max_length=100, primary_key=True)
    owner = models.CharField(_("owner"), max_length=64)
    acquired_at = models.DateTimeField(_("acquired at"))
    expires_at = models.DateTimeField(_("expires at"))

    class Meta:
        verbose_name = _("job lock")
        verbose_name_plural = _("job locks")

    def __str__(self) -> str:
        return self.name


class AlertState(models.Model):
    """What was already said about one alert key (see ``leasesite.notify``): whether its problem
    is ongoing, since when, and when it was last sent (for ``ALERT_DEDUP_SECONDS``)."""

    key = models.CharField(_("key"), max_length=200, primary_key=True)
    active = models.BooleanField(_("problem ongoing"), default=False)
    notified = models.BooleanField(_("start announced"), default=False)
    since = models.DateTimeField(_("since"), null=True, blank=True)
    # What the ongoing problem looked like when last announced (a digest of findings).
    fingerprint = models.CharField(_("fingerprint"), max_length=64, blank=True)
    last_sent_at = models.DateTimeField(_("last sent at"), null=True, blank=True)
    last_title = models.CharField(_("last title"), max_length=200, blank=True)

    class Meta:
        verbose_name = _("alert state")
        verbose_name_plural = _("alert states")

    def __str__(self) -> str:
        return self.key


class JobSuccess(models.Model):
    """When each periodic job last ended without an error, for ``check_health`` and ``/metrics``.

    One row per task name, overwritten in place (never grows). The ``leasesite.heartbeat`` row is
    beat's pulse: beat sends it every 30 s and any worker runs it.
    """

    task = models.CharField(_("task"), max_length=200, primary_key=True)
    succeeded_at = models.DateTimeField(_("last success"))

    class Meta:
        verbose_name = _("job success")
        verbose_name_plural = _("job successes")

    def __str__(self) -> str:
        return self.task
