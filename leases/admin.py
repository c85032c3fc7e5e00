"""The operator console for seat leases.

Actions call the services lease by lease, report how many worked, and name every lease that was
in the wrong state with the reason; a refused lease is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable

from django import forms
from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from leases.models import LeaseEvent, LeaseStatus, MemberLease, RedemptionCode, Team, TeamEvent, TeamHealth
from leases.selectors import team_seats_used, teams_with_seat_usage
from leases.services.health import team_health_set
from leases.services.operator import (
    EDITABLE_FIELDS,
    lease_cancel,
    lease_edit,
    lease_force_transfer,
    lease_reset,
    lease_retry,
)
from leases.services.redemption import MAX_CODES_PER_BATCH, codes_export_csv, codes_generate
from leases.services.sync import joins_sync
from leases.services.transitions import LeaseError


# -- teams -----------------------------------------------------------------------------------------------
class TeamForm(forms.ModelForm):
    pool = forms.CharField(
        label=_("pool"),
        required=False,
        max_length=50,
        help_text=_("Redemptions and transfers stay inside one pool. Empty: default."),
    )
    api_base = forms.URLField(
        label=_("API base URL"),
        required=False,
        max_length=500,
        assume_scheme="https",
        help_text=_("For the http provider: the URL that members, invites ... are relative to."),
    )
    api_token = forms.CharField(
        label=_("API token"),
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text=_("Stored encrypted; leave empty to keep the current token."),
    )

    class Meta:
        model = Team
        fields = ["name", "provider", "api_base", "api_token", "capacity", "is_active", "expires_at", "pool"]

    def clean_pool(self) -> str:
        return (self.cleaned_data.get("pool") or "").strip() or "default"

    def clean_api_token(self) -> str:
        value = (self.cleaned_data.get("api_token") or "").strip()
        if not value and self.instance.pk:
            # Keep the stored token as it is, even one no configured key decrypts (falsy).
            return "" if self.instance.api_token is None else self.instance.api_token
        return value


class TeamProblemFilter(admin.SimpleListFilter):
    """The overview's "teams unhealthy or failing to sync" link lands here."""

    title = _("problems")
    parameter_name = "problem"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", _("unhealthy or failing to sync")), ("no", _("none"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        troubled = ~Q(health=TeamHealth.HEALTHY) | ~Q(last_sync_error="")
        if self.value() == "yes":
            return queryset.filter(troubled, is_active=True)
        if self.value() == "no":
            return queryset.exclude(troubled)
        return queryset


class OverdueFilter(admin.SimpleListFilter):
    """Active leases past ``expires_at``: the transfer executor should have moved them."""

    title = _("overdue for transfer")
    parameter_name = "overdue"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", _("overdue for transfer"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.filter(status=LeaseStatus.ACTIVE, expires_at__lte=timezone.now())
        return queryset


class HistoryInline(admin.TabularInline):
    """An append-only history shown under its object: read-only, nothing added or deleted."""

    extra = 0
    can_delete = False
    ordering = ("created_at", "id")

    def get_readonly_fields(self, request: HttpRequest, obj: object = None) -> tuple[str, ...]:
        return tuple(self.fields)

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class TeamEventInline(HistoryInline):
    model = TeamEvent
    fields = ("created_at", "action", "from_health", "to_health", "actor", "detail")


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    form = TeamForm
    list_display = (
        "name",
        "pool",
        "health",
        "provider",
        "capacity",
        "seats_used_display",
        "is_active",
        "expires_at",
        "last_synced_at",
        "last_sync_error",
    )
    list_filter = (TeamProblemFilter, "health", "pool", "is_active", "provider")
    search_fields = ("name",)
    readonly_fields = (
        "masked_api_token_display",
        "health",
        "health_changed_at",
        "health_reason",
        "last_synced_at",
        "members_seen",
        "invites_seen",
        "last_sync_error",
        "created_at",
    )
    inlines = [TeamEventInline]
    actions = ["sync_now", "mark_healthy", "mark_dead"]

    @admin.action(description=_("Mark the selected teams healthy again (credentials fixed)"))
    def mark_healthy(self, request: HttpRequest, queryset: QuerySet[Team]) -> None:
        self._set_health(request, queryset, TeamHealth.HEALTHY, _("marked healthy by an operator"))

    @admin.action(description=_("Mark the selected teams dead (their leases move to healthy teams)"))
    def mark_dead(self, request: HttpRequest, queryset: QuerySet[Team]) -> None:
        self._set_health(request, queryset, TeamHealth.DEAD, _("marked dead by an operator"))

    def _set_health(self, request: HttpRequest, queryset: QuerySet[Team], health: str, reason: str) -> None:
        changed = sum(
            team_health_set(team_id=pk, health=health, reason=str(reason), actor_id=request.user.pk)
            for pk in queryset.order_by("pk").values_list("pk", flat=True)
        )
        self.message_user(
            request,
            _("%(count)d team(s) are now %(health)s.") % {"count": changed, "health": TeamHealth(health).label},
            messages.SUCCESS,
        )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Team]:
        return teams_with_seat_usage(super().get_queryset(request))

    @admin.display(description=_("seats used"))
    def seats_used_display(self, team: Team) -> str:
        return f"{team_seats_used(team)} / {team.capacity}"

    @admin.display(description=_("API token"))
    def masked_api_token_display(self, team: Team) -> str:
        return team.masked_api_token or "-"

    @admin.action(description=_("Sync joins of the selected teams now"))
    def sync_now(self, request: HttpRequest, queryset: QuerySet[Team]) -> None:
        for team in queryset.order_by("pk"):
            for result in joins_sync(team_id=team.pk):
                if result.ok:
                    self.message_user(
                        request,
                        _("%(team)s: %(joined)d joined, %(reinvited)d re-invited, %(invited)d invited.")
                        % {
                            "team": result.team,
                            "joined": result.joined,
                            "reinvited": result.reinvited,
                            "invited": result.invited,
                        },
                        messages.SUCCESS,
                    )
                else:
                    self.message_user(
                        request,
                        _("%(team)s: not synced: %(error)s")
                        % {"team": result.team, "error": result.skipped or result.error},
                        messages.ERROR,
                    )


# -- leases ------------------------------------------------------------------------------------------------
class LeaseEventInline(HistoryInline):
    model = LeaseEvent
    fields = ("created_at", "action", "from_status", "to_status", "actor", "detail")


@admin.register(MemberLease)
class MemberLeaseAdmin(admin.ModelAdmin):
    list_display = (
        "email",
        "team",
        "status",
        "term_months",
        "created_at",
        "invited_at",
        "joined_at",
        "expires_at",
        "ends_at",
        "attempts",
        "next_attempt_at",
    )
    list_filter = ("status", OverdueFilter, "team")
    list_select_related = ("team",)
    search_fields = ("email",)
    date_hierarchy = "created_at"
    raw_id_fields = ("team", "transfer_team")
    inlines = [LeaseEventInline]
    actions = ["reset_to_active", "retry_transfer", "force_transfer", "cancel_leases", "sync_now"]
    readonly_fields = (
        "public_id",
        "status",
        "team",
        "created_at",
        "invited_at",
        "joined_at",
        "expires_at",
        "attempts",
        "next_attempt_at",
        "last_error",
        "provider_member_id",
        "missed_syncs",
        "transfer_team",
        "transfer_step",
        "claimed_until",
        "claimed_by",
        "legacy_id",
        "status_page_link",
    )
    fields = ("email", *EDITABLE_FIELDS, *readonly_fields)

    def get_readonly_fields(self, request: HttpRequest, obj: MemberLease | None = None) -> tuple[str, ...]:
        return ("email", *self.readonly_fields)

    def save_model(self, request: HttpRequest, obj: MemberLease, form: forms.ModelForm, change: bool) -> None:
        """Edits go through the service (validated, one ``edited`` event); never a plain save."""
        values = {name: form.cleaned_data[name] for name in form.changed_data if name in EDITABLE_FIELDS}
        if not values:
            return
        try:
            lease_edit(lease_id=obj.pk, actor_id=request.user.pk, **values)
        except LeaseError as exc:
            self.message_user(request, str(exc), messages.ERROR)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # leases come from redemption (or the legacy import), never typed in

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # a lease's history is kept: cancel it instead

    @admin.display(description=_("status page"))
    def status_page_link(self, lease: MemberLease) -> str:
        url = reverse("leases:status", args=[lease.public_id])
        return format_html('<a href="{}">{}</a>', url, url)

    def _each(
        self,
        request: HttpRequest,
        queryset: QuerySet[MemberLease],
        operation: Callable[..., MemberLease],
        done_message: str,
    ) -> None:
        done, refused = 0, []
        for lease_id in queryset.order_by("pk").values_list("pk", flat=True):
            try:
                operation(lease_id=lease_id, actor_id=request.user.pk)
            except LeaseError as exc:
                refused.append(str(exc))
            except MemberLease.DoesNotExist:
                continue
            else:
                done += 1
        if done:
            self.message_user(request, done_message % {"count": done}, messages.SUCCESS)
        for reason in refused:
            self.message_user(request, reason, messages.ERROR)

    @admin.action(description=_("Reset selected failed leases to active"))
    def reset_to_active(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> None:
        self._each(request, queryset, lease_reset, _("%(count)d lease(s) reset to active."))

    @admin.action(description=_("Retry the transfer of selected failed leases"))
    def retry_transfer(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> None:
        self._each(request, queryset, lease_retry, _("%(count)d lease(s) queued for another transfer attempt."))

    @admin.action(description=_("Transfer selected active leases now"))
    def force_transfer(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> None:
        self._each(request, queryset, lease_force_transfer, _("%(count)d lease(s) are being transferred."))

    @admin.action(description=_("Cancel selected leases (free their seats)"))
    def cancel_leases(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> None:
        requested = []

        def cancel(*, lease_id: int, actor_id: int | None) -> None:
            outcome = lease_cancel(lease_id=lease_id, actor_id=actor_id, reason=str(_("cancelled in the admin")))
            if not outcome.cancelled:
                requested.append(lease_id)

        self._each(request, queryset, cancel, _("%(count)d lease(s) cancelled or marked for cancellation."))
        if requested:
            self.message_user(
                request,
                _(
                    "Lease(s) %(ids)s are being worked on right now (a transfer or an invite): they will be "
                    "cancelled as soon as its current step ends."
                )
                % {"ids": ", ".join(map(str, requested))},
                messages.WARNING,
            )

    @admin.action(description=_("Sync joins of the selected leases' teams now"))
    def sync_now(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> None:
        team_ids = sorted(set(queryset.values_list("team_id", flat=True)))
        joined = failed = 0
        for team_id in team_ids:
            for result in joins_sync(team_id=team_id):
                joined += result.joined
                failed += 0 if result.ok else 1
                if not result.ok:
                    self.message_user(request, f"{result.team}: {result.skipped or result.error}", messages.ERROR)
        self.message_user(
            request,
            ngettext(
                "%(teams)d team synced, %(joined)d lease(s) joined.",
                "%(teams)d teams synced, %(joined)d lease(s) joined.",
                len(team_ids) - failed,
            )
            % {"teams": len(team_ids) - failed, "joined": joined},
            messages.SUCCESS,
        )


@admin.register(LeaseEvent)
class LeaseEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "lease", "action", "from_status", "to_status", "actor")
    list_filter = ("action",)
    list_select_related = ("lease", "actor")
    search_fields = ("lease__email",)
    raw_id_fields = ("lease",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # append-only


# -- redemption codes ---------------------------------------------------------------------------------
class GenerateCodesForm(forms.Form):
    count = forms.IntegerField(label=_("number of codes"), min_value=1, max_value=MAX_CODES_PER_BATCH)
    term_months = forms.IntegerField(label=_("term (months per team)"), min_value=1, max_value=120)
    total_months = forms.IntegerField(
        label=_("entitlement (months)"),
        min_value=1,
        max_value=1200,
        required=False,
        help_text=_("Leave empty: the seat keeps moving to the next team until cancelled."),
    )
    batch = forms.CharField(label=_("batch label"), max_length=100, required=False)

    def clean(self) -> dict:
        data = super().clean()
        total, term = data.get("total_months"), data.get("term_months")
        if total is not None and term is not None and total < term:
            self.add_error("total_months", _("The entitlement cannot be shorter than one term."))
        return data


class RedeemedFilter(admin.SimpleListFilter):
    title = _("redeemed")
    parameter_name = "redeemed"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", _("redeemed")), ("no", _("not redeemed"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.filter(redeemed_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(redeemed_at__isnull=True)
        return queryset


@admin.register(RedemptionCode)
class RedemptionCodeAdmin(admin.ModelAdmin):
    list_display = ("code", "batch", "term_months", "total_months", "created_at", "redeemed_at", "lease")
    list_filter = (RedeemedFilter, "batch")
    list_select_related = ("lease",)
    search_fields = ("code", "batch", "lease__email")
    raw_id_fields = ("lease",)
    readonly_fields = ("code", "created_at", "redeemed_at", "lease")
    actions = ["export_csv"]
    change_list_template = "admin/leases/redemptioncode/change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # codes are generated in batches (the "generate codes" page)

    def get_urls(self) -> list:
        return [
            path("generate/", self.admin_site.admin_view(self.generate_view), name="leases_redemptioncode_generate"),
            *super().get_urls(),
        ]

    def generate_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_change_permission(request):
            return redirect("admin:index")
        form = GenerateCodesForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                codes = codes_generate(
                    count=form.cleaned_data["count"],
                    term_months=form.cleaned_data["term_months"],
                    total_months=form.cleaned_data["total_months"],
                    batch=form.cleaned_data["batch"] or "",
                )
            except LeaseError as exc:
                form.add_error(None, str(exc))
            else:
                batch = RedemptionCode.objects.get(code=codes[0]).batch
                self.message_user(
                    request,
                    _("%(count)d code(s) generated in batch %(batch)s. Select them and export as CSV.")
                    % {"count": len(codes), "batch": batch},
                    messages.SUCCESS,
                )
                url = reverse("admin:leases_redemptioncode_changelist")
                return redirect(f"{url}?batch={batch}")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "form": form,
            "title": _("Generate redemption codes"),
        }
        return TemplateResponse(request, "admin/leases/redemptioncode/generate.html", context)

    @admin.action(description=_("Export selected codes as CSV"))
    def export_csv(self, request: HttpRequest, queryset: QuerySet[RedemptionCode]) -> HttpResponse:
        text = codes_export_csv(queryset.select_related("lease").order_by("batch", "code"))
        response = HttpResponse("\ufeff" + text, content_type="text/csv; charset=utf-8")  # BOM: Excel reads UTF-8
        stamp = timezone.localtime().strftime("%Y%m%d-%H%M%S")
        response["Content-Disposition"] = f'attachment; filename="redemption-codes-{stamp}.csv"'
        return response
