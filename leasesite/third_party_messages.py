"""Operator-facing words of third-party apps that ship no zh-hans translation (django-axes).

Never imported at run time: ``makemessages`` reads these calls so the words land in leasesite's
catalog, and Django merges every app's catalog, so axes' own ``gettext`` calls find them.
"""

from django.utils.translation import gettext_noop as _

AXES_MESSAGES = [
    _("Axes"),
    _("access attempt"),
    _("access attempts"),
    _("access failure"),
    _("access failures"),
    _("access log"),
    _("access logs"),
    _("access attempt expiration"),
    _("access attempt expirations"),
    _("Access Attempt"),
    _("Access lock out"),
    _("Attempt Time"),
    _("Expires At"),
    _("Failed Logins"),
    _("Form Data"),
    _("GET Data"),
    _("POST Data"),
    _("HTTP Accept"),
    _("IP Address"),
    _("Locked Out"),
    _("Logout Time"),
    _("Meta Data"),
    _("Path"),
    _("User Agent"),
    _("Username"),
    _("Session key hash (sha256)"),
    _("Clean up expired attempts"),
    _("The time when access attempt expires and is no longer valid."),
]
