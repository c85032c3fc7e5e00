from django.contrib import admin
from django.http import HttpRequest

from leasesite.models import AlertState, JobLock, JobSuccess


@admin.register(JobLock)
class JobLockAdmin(admin.ModelAdmin):
    """Who holds which job lock and until when; deleting one frees a stuck job at once."""

    list_display = ("name", "owner", "acquired_at", "expires_at")
    readonly_fields = ("name", "owner", "acquired_at", "expires_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(AlertState)
class AlertStateAdmin(admin.ModelAdmin):
    """Which problems are ongoing (announced once) and when each alert key was last sent."""

    list_display = ("key", "active", "since", "notified", "last_sent_at", "last_title")
    list_filter = ("active",)
    search_fields = ("key", "last_title")
    readonly_fields = list_display

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(JobSuccess)
class JobSuccessAdmin(admin.ModelAdmin):
    """When each periodic job last ended without an error (the heartbeat is beat's pulse)."""

    list_display = ("task", "succeeded_at")
    readonly_fields = list_display

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
