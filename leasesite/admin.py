from django.contrib import admin
from django.http import HttpRequest

from leasesite.models import JobLock


@admin.register(JobLock)
class JobLockAdmin(admin.ModelAdmin):
    """Who holds which job lock and until when; deleting one frees a stuck job at once."""

    list_display = ("name", "owner", "acquired_at", "expires_at")
    readonly_fields = ("name", "owner", "acquired_at", "expires_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
