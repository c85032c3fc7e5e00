"""The operator console for seat leases.

Actions call the services lease by lease, report how many worked, and name every lease that was
in the wrong state with the reason; a refused lease is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from leases.history import event_line, lease_history
from leases.models import (
    LeaseEvent,
    LeaseStatus,
    MemberLease,
    RedemptionCode,
    Team,
    TeamEvent,
    TeamHealth,
)
from leases.operations import BY_NAME, operation_allowed, operation_run, operations_for
from leases.selectors import failed_leases_of_team, team_seats_used, teams_with_seat_usage
from leases.services.health import team_health_set
from leases.services.operator import (
    EDITABLE_FIELDS,
    lease_edit,
    lease_note,
    lease_reset,
    lease_retry,
)
from leases.services.redemption import MAX_CODES_PER_BATCH, codes_export_csv, codes_generate, pool_normalize
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
    actions = ["sync_now", "retry_failed_leases", "mark_healthy", "mark_dead"]
    change_form_template = "admin/leases/team/change_form.html"

    def has_manage_team_health_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("leases.can_manage_team_health")

    def has_retry_leases_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("leases.change_memberlease")

    @admin.action(
        description=_("Mark the selected teams healthy again (credentials fixed)"), permissions=["manage_team_health"]
    )
    def mark_healthy(self, request: HttpRequest, queryset: QuerySet[Team]) -> HttpResponse | None:
        return self._set_health(request, queryset, TeamHealth.HEALTHY, _("marked healthy by an operator"))

    @admin.action(
        description=_("Mark the selected teams dead (their leases move to healthy teams)"),
        permissions=["manage_team_health"],
    )
    def mark_dead(self, request: HttpRequest, queryset: QuerySet[Team]) -> HttpResponse | None:
        return self._set_health(request, queryset, TeamHealth.DEAD, _("marked dead by an operator"))

    def _set_health(
        self, request: HttpRequest, queryset: QuerySet[Team], health: str, reason: str
    ) -> HttpResponse | None:
        teams = list(teams_with_seat_usage(queryset).order_by("name"))
        if request.POST.get("confirmed") != "yes":
            if health == TeamHealth.DEAD:
                explanation = _(
                    "These teams take no redemptions or transfers any more, and every open lease in them is "
                    "moved to a healthy team of its pool."
                )
            else:
                explanation = _("These teams take redemptions and transfers again.")
            changes = [
                _("%(team)s: %(old)s → %(new)s (%(leases)d open lease(s))")
                % {
                    "team": team.name,
                    "old": team.get_health_display(),
                    "new": TeamHealth(health).label,
                    "leases": team.leases_held,
                }
                for team in teams
            ]
            return confirmation_page(
                self,
                request,
                title=TeamHealth(health).label,
                explanation=explanation,
                changes=changes,
                refused=[],
                action="mark_dead" if health == TeamHealth.DEAD else "mark_healthy",
                ids=[team.pk for team in teams],
            )
        changed = sum(
            team_health_set(team_id=team.pk, health=health, reason=str(reason), actor_id=request.user.pk)
            for team in teams
        )
        self.message_user(
            request,
            _("%(count)d team(s) are now %(health)s.") % {"count": changed, "health": TeamHealth(health).label},
            messages.SUCCESS,
        )
        return None

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
        queue_team_syncs(self, request, list(queryset.order_by("pk").values_list("pk", flat=True)))

    @admin.action(description=_("Retry every lease that failed on the selected teams"), permissions=["retry_leases"])
    def retry_failed_leases(self, request: HttpRequest, queryset: QuerySet[Team]) -> None:
        for team in queryset.order_by("name"):
            self._retry_failed(request, team)

    def _retry_failed(self, request: HttpRequest, team: Team) -> None:
        ids = list(failed_leases_of_team(team).order_by("pk").values_list("pk", flat=True))
        done, refused = 0, []
        for lease_id in ids:
            try:
                lease_retry(lease_id=lease_id, actor_id=request.user.pk)
            except LeaseError as exc:
                refused.append(str(exc))
            else:
                done += 1
        self.message_user(
            request,
            _("%(team)s: %(count)d failed lease(s) queued for another transfer attempt.")
            % {"team": team.name, "count": done},
            messages.SUCCESS if done or not refused else messages.WARNING,
        )
        for reason in refused:
            self.message_user(request, reason, messages.ERROR)

    def get_urls(self) -> list:
        return [
            path(
                "<int:team_id>/retry-failed/",
                self.admin_site.admin_view(self.retry_failed_view),
                name="leases_team_retry_failed",
            ),
            *super().get_urls(),
        ]

    def retry_failed_view(self, request: HttpRequest, team_id: int) -> HttpResponse:
        team = get_object_or_404(Team, pk=team_id)
        if request.method != "POST":
            return redirect("admin:leases_team_change", team_id)
        if not self.has_retry_leases_permission(request):
            raise PermissionDenied
        self._retry_failed(request, team)
        return redirect("admin:leases_team_change", team_id)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        team = Team.objects.filter(pk=object_id).first() if str(object_id).isdigit() else None
        extra = {
            "failed_here": failed_leases_of_team(team).count() if team else 0,
            "can_retry_leases": self.has_retry_leases_permission(request),
            "failed_list_url": reverse("admin:leases_memberlease_changelist") + "?status__exact=failed",
        }
        return super().change_view(request, object_id, form_url, {**extra, **(extra_context or {})})


def queue_team_syncs(model_admin: admin.ModelAdmin, request: HttpRequest, team_ids: list[int]) -> None:
    """Join syncs run on a worker (no provider call inside a request): queue one task per team."""
    from leases.tasks import sync_joins

    for team_id in team_ids:
        transaction.on_commit(lambda team_id=team_id: sync_joins.delay(team_id=team_id))
    model_admin.message_user(
        request,
        ngettext(
            "Join sync of %(count)d team queued; its result appears on the team's page within a minute.",
            "Join sync of %(count)d teams queued; their results appear on the teams' pages within a minute.",
            len(team_ids),
        )
        % {"count": len(team_ids)},
        messages.SUCCESS,
    )


def confirmation_page(
    model_admin: admin.ModelAdmin,
    request: HttpRequest,
    *,
    title: object,
    explanation: object,
    changes: list,
    refused: list,
    action: str,
    ids: list[int],
) -> TemplateResponse:
    """The page a dangerous bulk action shows first: what will change, what is refused, confirm."""
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.model._meta,
        "title": _("Are you sure?"),
        "subtitle": title,
        "operation_title": title,
        "explanation": explanation,
        "changes": changes,
        "refused": refused,
        "action": action,
        "ids": ids,
        "changelist_url": reverse(
            f"admin:{model_admin.model._meta.app_label}_{model_admin.model._meta.model_name}_changelist"
        ),
    }
    return TemplateResponse(request, "admin/leases/confirm_action.html", context)


# -- leases ------------------------------------------------------------------------------------------------
class NoteForm(forms.Form):
    text = forms.CharField(label=_("note"), max_length=1000, widget=forms.Textarea(attrs={"rows": 2}))


@admin.register(MemberLease)
class MemberLeaseAdmin(admin.ModelAdmin):
    list_display = (
        "email",
        "team",
        "pool",
        "status",
        "error_display",
        "term_months",
        "created_at",
        "invited_at",
        "joined_at",
        "expires_at",
        "ends_at",
        "attempts",
        "next_attempt_at",
    )
    list_filter = ("status", OverdueFilter, "pool", "team")
    list_select_related = ("team",)
    search_fields = ("email",)
    date_hierarchy = "created_at"
    raw_id_fields = ("team", "transfer_team")
    actions = ["retry_transfer", "reset_to_active", "force_transfer", "cancel_leases", "sync_now"]
    change_form_template = "admin/leases/memberlease/change_form.html"
    readonly_fields = (
        "public_id",
        "status",
        "team",
        "pool",
        "transfer_team",
        "error_display",
        "created_at",
        "invited_at",
        "joined_at",
        "expires_at",
        "attempts",
        "next_attempt_at",
        "provider_member_id",
        "missed_syncs",
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

    def has_force_transfer_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("leases.can_force_transfer")

    def has_cancel_lease_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("leases.can_cancel_lease")

    @admin.display(description=_("error"))
    def error_display(self, lease: MemberLease) -> str:
        if not lease.last_error:
            return "-"
        return lease.last_error if len(lease.last_error) <= 160 else lease.last_error[:159] + "…"

    @admin.display(description=_("status page"))
    def status_page_link(self, lease: MemberLease) -> str:
        url = reverse("leases:status", args=[lease.public_id])
        return format_html('<a href="{}">{}</a>', url, url)

    # -- the lease's page: its operations, a note, the readable history ---------------------------------
    def get_urls(self) -> list:
        return [
            path(
                "<int:lease_id>/operate/<slug:name>/",
                self.admin_site.admin_view(self.operate_view),
                name="leases_memberlease_operate",
            ),
            path("<int:lease_id>/note/", self.admin_site.admin_view(self.note_view), name="leases_memberlease_note"),
            *super().get_urls(),
        ]

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        lease = MemberLease.objects.select_related("team").filter(pk=object_id).first() if object_id.isdigit() else None
        extra: dict = {}
        if lease is not None:
            history, older = lease_history(lease.pk)
            extra = {
                "operations": [
                    (op, reverse("admin:leases_memberlease_operate", args=[lease.pk, op.name]))
                    for op in operations_for(lease, request.user)
                ],
                "note_form": NoteForm() if self.has_change_permission(request, lease) else None,
                "note_url": reverse("admin:leases_memberlease_note", args=[lease.pk]),
                "history": history,
                "history_older": older,
                "lease_obj": lease,
            }
        return super().change_view(request, object_id, form_url, {**extra, **(extra_context or {})})

    def operate_view(self, request: HttpRequest, lease_id: int, name: str) -> HttpResponse:
        lease = get_object_or_404(MemberLease.objects.select_related("team"), pk=lease_id)
        operation = BY_NAME.get(name)
        if operation is None:
            return redirect("admin:leases_memberlease_change", lease_id)
        if not request.user.has_perm(operation.permission):
            raise PermissionDenied
        if not operation_allowed(operation, lease.status):
            self.message_user(
                request,
                _("Lease %(id)s is %(status)s: “%(operation)s” is not possible from this state.")
                % {"id": lease.pk, "status": lease.get_status_display(), "operation": operation.label},
                messages.ERROR,
            )
            return redirect("admin:leases_memberlease_change", lease_id)
        if request.method != "POST":
            if not operation.dangerous:
                return redirect("admin:leases_memberlease_change", lease_id)
            context = {
                **self.admin_site.each_context(request),
                "opts": self.model._meta,
                "original": lease,
                "title": _("Are you sure?"),
                "subtitle": operation.label,
                "operation": operation,
                "lease": lease,
                "new_status": LeaseStatus(operation.to_status).label,
                "change_url": reverse("admin:leases_memberlease_change", args=[lease.pk]),
            }
            return TemplateResponse(request, "admin/leases/memberlease/confirm_operation.html", context)
        try:
            message = operation_run(operation.name, lease_id=lease.pk, actor_id=request.user.pk)
        except LeaseError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            self.message_user(request, message, messages.SUCCESS)
        return redirect("admin:leases_memberlease_change", lease_id)

    def note_view(self, request: HttpRequest, lease_id: int) -> HttpResponse:
        lease = get_object_or_404(MemberLease, pk=lease_id)
        if request.method != "POST":
            return redirect("admin:leases_memberlease_change", lease_id)
        if not self.has_change_permission(request, lease):
            raise PermissionDenied
        form = NoteForm(request.POST)
        if not form.is_valid():
            self.message_user(request, _("A note cannot be empty."), messages.ERROR)
            return redirect("admin:leases_memberlease_change", lease_id)
        try:
            lease_note(lease_id=lease.pk, actor_id=request.user.pk, text=form.cleaned_data["text"])
        except LeaseError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            self.message_user(request, _("Note added to the history."), messages.SUCCESS)
        return redirect("admin:leases_memberlease_change", lease_id)

    # -- bulk actions -----------------------------------------------------------------------------------
    def _each(
        self,
        request: HttpRequest,
        queryset: QuerySet[MemberLease],
        operation: Callable[..., object],
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

    def _confirm(
        self, request: HttpRequest, queryset: QuerySet[MemberLease], name: str, action: str
    ) -> TemplateResponse | None:
        """None once confirmed; else the page listing which leases change and which are refused."""
        if request.POST.get("confirmed") == "yes":
            return None
        operation = BY_NAME[name]
        leases = list(queryset.select_related("team").order_by("pk")[:1000])
        new_status = LeaseStatus(operation.to_status).label
        changes, refused = [], []
        for lease in leases:
            team = lease.team.name if lease.team is not None else "—"  # a waiting lease has no team yet
            line = f"{lease.email} @ {team}: {lease.get_status_display()} → {new_status}"
            if operation_allowed(operation, lease.status):
                changes.append(line)
            else:
                refused.append(
                    _("%(email)s is %(status)s: left as it is.")
                    % {"email": lease.email, "status": lease.get_status_display()}
                )
        return confirmation_page(
            self,
            request,
            title=operation.label,
            explanation=operation.explanation,
            changes=changes,
            refused=refused,
            action=action,
            ids=[lease.pk for lease in leases],
        )

    @admin.action(description=_("Retry the transfer of selected failed leases"))
    def retry_transfer(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> None:
        self._each(request, queryset, lease_retry, _("%(count)d lease(s) queued for another transfer attempt."))

    @admin.action(description=_("Reset selected failed leases to active"))
    def reset_to_active(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> None:
        self._each(request, queryset, lease_reset, _("%(count)d lease(s) reset to active."))

    @admin.action(description=_("Transfer selected active leases now"), permissions=["force_transfer"])
    def force_transfer(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> HttpResponse | None:
        page = self._confirm(request, queryset, "force_transfer", "force_transfer")
        if page is not None:
            return page
        from leases.services.operator import lease_force_transfer

        self._each(request, queryset, lease_force_transfer, _("%(count)d lease(s) are being transferred."))
        return None

    @admin.action(description=_("Cancel selected leases (free their seats)"), permissions=["cancel_lease"])
    def cancel_leases(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> HttpResponse | None:
        page = self._confirm(request, queryset, "cancel", "cancel_leases")
        if page is not None:
            return page
        from leases.services.cancellation import lease_cancel

        requested = []

        def cancel(*, lease_id: int, actor_id: int | None) -> None:
            outcome = lease_cancel(
                lease_id=lease_id, actor_id=actor_id, reason=str(_("cancelled in the admin")), free_seats_later=True
            )
            if not outcome.cancelled:
                requested.append(lease_id)

        self._each(
            request,
            queryset,
            cancel,
            _("%(count)d lease(s) cancelled or marked for cancellation; workers free their seats now."),
        )
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
        return None

    @admin.action(description=_("Sync joins of the selected leases' teams now"))
    def sync_now(self, request: HttpRequest, queryset: QuerySet[MemberLease]) -> None:
        queue_team_syncs(self, request, sorted(set(queryset.values_list("team_id", flat=True))))


@admin.register(LeaseEvent)
class LeaseEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "lease", "sentence", "status_change", "actor")
    list_filter = ("action",)
    list_select_related = ("lease", "lease__team", "actor")
    search_fields = ("lease__email",)
    raw_id_fields = ("lease",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # append-only

    @admin.display(description=_("what happened"))
    def sentence(self, event: LeaseEvent) -> str:
        return event_line(event).sentence

    @admin.display(description=_("status"))
    def status_change(self, event: LeaseEvent) -> str:
        return event_line(event).status_change or "-"


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
    pool = forms.CharField(
        label=_("pool"),
        max_length=50,
        required=False,
        help_text=_("The pool whose teams these codes seat. Empty: default."),
    )

    def clean_pool(self) -> str:
        try:
            return pool_normalize(self.cleaned_data.get("pool"))
        except LeaseError as exc:
            raise forms.ValidationError(str(exc)) from None

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
    list_display = ("code", "batch", "pool", "term_months", "total_months", "created_at", "redeemed_at", "lease")
    list_filter = (RedeemedFilter, "pool", "batch")
    list_select_related = ("lease",)
    search_fields = ("code", "batch", "lease__email")
    raw_id_fields = ("lease",)
    readonly_fields = ("code", "created_at", "redeemed_at", "lease")
    actions = ["export_csv"]
    change_list_template = "admin/leases/redemptioncode/change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # codes are generated in batches (the "generate codes" page)

    def has_delete_permission(self, request: HttpRequest, obj: RedemptionCode | None = None) -> bool:
        if obj is not None and obj.redeemed_at is not None:
            return False  # a redeemed code is part of its lease's history
        return super().has_delete_permission(request, obj)

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        if "delete_selected" in actions:
            _func, name, description = actions["delete_selected"]
            actions["delete_selected"] = (type(self).delete_unredeemed, name, description)
        return actions

    def delete_unredeemed(self, request: HttpRequest, queryset: QuerySet[RedemptionCode]) -> HttpResponse | None:
        """Django's delete (with its confirmation page), refused whole when a redeemed code is selected."""
        redeemed = list(queryset.filter(redeemed_at__isnull=False).order_by("code").values_list("code", flat=True)[:20])
        if redeemed:
            self.message_user(
                request,
                _(
                    "Redeemed codes cannot be deleted (they belong to a lease's history): %(codes)s. "
                    "Nothing was deleted."
                )
                % {"codes": ", ".join(redeemed)},
                messages.ERROR,
            )
            return None
        from django.contrib.admin.actions import delete_selected

        return delete_selected(self, request, queryset)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[RedemptionCode]) -> None:
        super().delete_queryset(request, queryset.filter(redeemed_at__isnull=True))

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
                    pool=form.cleaned_data["pool"],
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
