"""The operator console for tokens: masked tokens, filters, "refresh now", audited deletion."""

from __future__ import annotations

from datetime import datetime, timedelta

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import conditional_escape, format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from leasesite.crypto import fingerprint_secret
from tokens.admin_qr import QrLoginViews
from tokens.models import (
    BaomingToken,
    CheckOutcomeChoice,
    RefreshRun,
    RunTrigger,
    TokenCheckRecord,
    TokenDeletion,
    TokenHealth,
)
from tokens.selectors import (
    refresh_run_holding_lock,
    run_deletions,
    run_token_results,
    token_by_plaintext,
    token_recent_checks,
    tokens_last_activity,
    tokens_with_health,
)
from tokens.services.refresh import RefreshAlreadyRunning, token_refresh_start
from tokens.services.tokens import TOKEN_PATTERN, tokens_delete_by_operator


class LastUsedFilter(admin.SimpleListFilter):
    title = _("last used")
    parameter_name = "age"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [
            ("7", _("within 7 days")),
            ("30", _("7 to 30 days ago")),
            ("old", _("more than 30 days ago")),
            ("never", _("never used")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        now = timezone.now()
        week, month = now - timedelta(days=7), now - timedelta(days=30)
        activity = queryset.alias(activity=tokens_last_activity())
        match self.value():
            case "7":
                return activity.filter(activity__gte=week)
            case "30":
                return activity.filter(activity__lt=week, activity__gte=month)
            case "old":
                return activity.filter(activity__lt=month)
            case "never":
                return queryset.filter(last_used__isnull=True)
        return queryset


class FailureFilter(admin.SimpleListFilter):
    title = _("consecutive failures")
    parameter_name = "failures"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("0", _("none")), ("1", _("1 to 2")), ("3", _("3 or more"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        match self.value():
            case "0":
                return queryset.filter(consecutive_failures=0)
            case "1":
                return queryset.filter(consecutive_failures__gte=1, consecutive_failures__lte=2)
            case "3":
                return queryset.filter(consecutive_failures__gte=3)
        return queryset


class HealthFilter(admin.SimpleListFilter):
    title = _("health")
    parameter_name = "health"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return list(TokenHealth.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in TokenHealth.values:
            return tokens_with_health(queryset, self.value())
        return queryset


def _minute(value: datetime | None) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M") if value else "-"


def health_since(token: BaomingToken) -> datetime | None:
    """When the token's current suspect or failing streak started (None while valid)."""
    match token.health:
        case TokenHealth.SUSPECT:
            return token.suspect_since
        case TokenHealth.FAILING:
            return token.failing_since
    return None


def format_message(template: str, **values: object) -> SafeString:
    """A translated ``%(name)s`` message as HTML: the message's own text and every value are
    escaped (values already safe, such as links made with ``format_html``, stay as they are)."""
    text = conditional_escape(template).replace("{", "{{").replace("}", "}}")
    return format_html(text % {name: "{" + name + "}" for name in values}, **values)


def run_admin_link(run: RefreshRun) -> SafeString:
    return format_html('<a href="{}">#{}</a>', reverse("admin:tokens_refreshrun_change", args=[run.pk]), run.pk)


def render_recent_checks(token_pk: int) -> SafeString:
    """A token's recent checks as a read-only table (one query), newest first, each run linked."""
    checks = token_recent_checks(token_pk=token_pk)
    if not checks:
        return format_html("<p>{}</p>", _("No checks recorded yet."))

    def run_link(run_id: int | None) -> SafeString | str:
        if run_id is None:
            return "-"
        return format_html('<a href="{}">#{}</a>', reverse("admin:tokens_refreshrun_change", args=[run_id]), run_id)

    rows = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        (
            (
                timezone.localtime(check.checked_at).strftime("%Y-%m-%d %H:%M:%S"),
                CheckOutcomeChoice(check.outcome).label
                if check.outcome in CheckOutcomeChoice.values
                else check.outcome,
                check.message or "-",
                check.http_status or "-",
                run_link(check.run_id),
            )
            for check in checks
        ),
    )
    return format_html(
        '<table class="recent-checks"><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>'
        "</thead><tbody>{}</tbody></table>",
        _("checked at"),
        _("outcome"),
        _("message"),
        _("HTTP status"),
        _("run"),
        rows,
    )


class BaomingTokenForm(forms.ModelForm):
    token = forms.CharField(
        label=_("token"),
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text=_("32 hexadecimal characters. Stored encrypted; leave empty to keep the current token."),
    )

    class Meta:
        model = BaomingToken
        fields = ["card_name", "user_name", "token"]

    def clean_token(self) -> str:
        value = (self.cleaned_data.get("token") or "").strip().lower()
        if not value:
            if self.instance.pk:
                return self.instance.token
            raise forms.ValidationError(_("A token is required."))
        if not TOKEN_PATTERN.fullmatch(value):
            raise forms.ValidationError(_("A token is 32 hexadecimal characters."))
        duplicate = BaomingToken.objects.filter(fingerprint=fingerprint_secret(value))
        if self.instance.pk:
            duplicate = duplicate.exclude(pk=self.instance.pk)
        if duplicate.exists():
            raise forms.ValidationError(_("This token is already stored."))
        return value


class FindByTokenForm(forms.Form):
    token = forms.CharField(
        label=_("token"),
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off", "autofocus": True}),
        help_text=_(
            "Paste the full token (32 hexadecimal characters). It is sent in the body of a POST "
            "request, never in the address, so it stays out of the web server's access logs."
        ),
    )

    def clean_token(self) -> str:
        value = self.cleaned_data["token"].strip().lower()
        if not TOKEN_PATTERN.fullmatch(value):
            raise forms.ValidationError(_("A token is 32 hexadecimal characters."))
        return value


@admin.register(BaomingToken)
class BaomingTokenAdmin(admin.ModelAdmin):
    form = BaomingTokenForm
    change_list_template = "admin/tokens/baomingtoken/change_list.html"
    list_display = (
        "card_name",
        "user_name",
        "masked_token_display",
        "health_display",
        "health_since_display",
        "suspect_count",
        "last_error_display",
        "last_used",
        "last_checked_at",
        "consecutive_failures",
        "created_at",
    )
    list_filter = (HealthFilter, LastUsedFilter, FailureFilter)
    search_fields = ("card_name", "user_name")
    ordering = ("card_name", "id")
    readonly_fields = (
        "masked_token_display",
        "health_display",
        "health_since_display",
        "failing_since",
        "suspect_count",
        "suspect_since",
        "last_error",
        "created_at",
        "last_used",
        "last_checked_at",
        "last_answered_at",
        "consecutive_failures",
        "recent_checks",
    )
    actions = ["refresh_now", "delete_with_audit"]
    list_per_page = 100
    show_full_result_count = False

    @admin.display(description=_("token"))
    def masked_token_display(self, obj: BaomingToken) -> str:
        return obj.masked_token

    @admin.display(description=_("health"))
    def health_display(self, obj: BaomingToken) -> str:
        return TokenHealth(obj.health).label

    @admin.display(description=_("since"))
    def health_since_display(self, obj: BaomingToken) -> str:
        return _minute(health_since(obj))

    @admin.display(description=_("last message"), ordering="last_error")
    def last_error_display(self, obj: BaomingToken) -> str:
        return Truncator(obj.last_error).chars(60) or "-"

    @admin.display(description=_("recent checks"))
    def recent_checks(self, obj: BaomingToken) -> SafeString:
        return render_recent_checks(obj.pk)

    def get_fields(self, request: HttpRequest, obj: BaomingToken | None = None) -> list[str]:
        fields = ["card_name", "user_name", "token"]
        if obj is not None:
            fields += list(self.readonly_fields)
        return fields

    def get_urls(self) -> list[URLPattern]:
        find = path(
            "find-by-token/",
            self.admin_site.admin_view(self.find_by_token_view),
            name=f"{self.opts.app_label}_{self.opts.model_name}_find",
        )
        return [find, *QrLoginViews(self).urls(), *super().get_urls()]

    def find_by_token_view(self, request: HttpRequest) -> HttpResponse:
        """ "按 Token 查找": the token travels in a POST body (CSRF-protected by admin_view), and
        the answer is a redirect to the row by its id — no address ever holds the token."""
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        form = FindByTokenForm(request.POST if request.method == "POST" else None)
        if form.is_valid():
            found = token_by_plaintext(token=form.cleaned_data["token"])
            if found is not None:
                return HttpResponseRedirect(
                    reverse(
                        f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
                        args=[found.pk],
                        current_app=self.admin_site.name,
                    )
                )
            messages.warning(request, _("No stored token matches the one you pasted."))
            form = FindByTokenForm()  # never render the pasted token back
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "form": form,
            "title": _("Find by token"),
        }
        return TemplateResponse(request, "admin/tokens/baomingtoken/find_by_token.html", context)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        """A pasted token is not searched: the search box is a GET, so the token would sit in the
        address and in every access log on the way. Point to the POST form instead."""
        if TOKEN_PATTERN.fullmatch(search_term.strip().lower()):
            url = reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_find", current_app=self.admin_site.name)
            messages.warning(
                request,
                format_html(
                    '{} <a href="{}">{}</a>',
                    _("Tokens are not searched here: the search box puts them in the address (and in server logs)."),
                    url,
                    _("Find by token"),
                ),
            )
            return queryset.none(), False
        return super().get_search_results(request, queryset, search_term)

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # replaced by the audited deletion below
        return actions

    @admin.action(description=_("Refresh selected tokens now"), permissions=["change"])
    def refresh_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Start the run here, in the request, so the message links to the very run that gets the
        results: ``token_refresh_start`` (what the ``tokens.refresh_tokens`` task calls) takes the
        lock and writes the run and its batches — database work only, no upstream call — and
        sends the batches to the workers after commit (the sweeper re-sends any that get lost).
        There is no "queued" run status, and the task cannot be handed a run made beforehand."""
        from tokens.tasks import refresh_batch

        token_ids = list(queryset.values_list("id", flat=True))
        try:
            run = token_refresh_start(trigger=RunTrigger.ADMIN, token_ids=token_ids, dispatch=refresh_batch.delay)
        except RefreshAlreadyRunning:
            self.message_user(request, self._refresh_refused_message(), messages.WARNING)
            return
        self.message_user(
            request,
            format_message(
                ngettext(
                    "Refresh of %(count)s token queued as run %(run)s; its result appears there.",
                    "Refresh of %(count)s tokens queued as run %(run)s; their results appear there.",
                    run.planned,
                ),
                count=run.planned,
                run=run_admin_link(run),
            ),
            messages.SUCCESS,
        )

    @staticmethod
    def _refresh_refused_message() -> SafeString | str:
        holder = refresh_run_holding_lock()
        if holder is None:  # the lock is between runs (taken, its run not written yet)
            return _("A refresh run is in progress; try again when it has finished.")
        return format_message(
            gettext(
                "Nothing queued: refresh run %(run)s (started %(started)s, trigger: %(trigger)s) is in progress; "
                "try again when it has finished."
            ),
            run=run_admin_link(holder),
            started=_minute(holder.started_at),
            trigger=holder.get_trigger_display(),
        )

    @admin.action(description=_("Delete selected tokens (with audit record)"), permissions=["delete"])
    def delete_with_audit(self, request: HttpRequest, queryset: QuerySet) -> None:
        deleted = tokens_delete_by_operator(token_ids=list(queryset.values_list("id", flat=True)), actor=request.user)
        self.message_user(
            request,
            ngettext("%(count)d token deleted.", "%(count)d tokens deleted.", deleted) % {"count": deleted},
            messages.SUCCESS,
        )

    def delete_model(self, request: HttpRequest, obj: BaomingToken) -> None:
        tokens_delete_by_operator(token_ids=[obj.pk], actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        tokens_delete_by_operator(token_ids=list(queryset.values_list("id", flat=True)), actor=request.user)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(RefreshRun)
class RefreshRunAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "kind",
        "trigger",
        "status",
        "dry_run",
        "started_at",
        "duration_display",
        "planned",
        "total",
        "ok",
        "failed",
        "invalid",
        "deleted_display",
        "rate_limited",
        "breaker_tripped",
    )
    list_filter = ("kind", "status", "trigger", "breaker_tripped", "dry_run")
    date_hierarchy = "started_at"
    exclude = ("lock_owner",)
    change_form_template = "admin/tokens/refreshrun/change_form.html"
    # How many deleted tokens and per-token results the run page lists (the rest: filtered lists).
    page_rows = 200

    @admin.display(description=_("duration (s)"), ordering="duration_seconds")
    def duration_display(self, obj: RefreshRun) -> str:
        return "-" if obj.duration_seconds is None else f"{obj.duration_seconds:.2f}"

    @admin.display(description=_("deleted"), ordering="deleted")
    def deleted_display(self, obj: RefreshRun) -> SafeString | int:
        if not obj.deleted or obj.dry_run:  # a dry run counts what it would have deleted: no records
            return obj.deleted
        return format_html('<a href="{}">{}</a>', run_deletions_url(obj.pk), obj.deleted)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        context = dict(extra_context or {})
        run_id = _int_or_none(object_id)
        if run_id is not None and self.has_view_or_change_permission(request):
            deletions, deletions_total = run_deletions(run_id=run_id, limit=self.page_rows)
            results, results_total = run_token_results(run_id=run_id, limit=self.page_rows)
            context.update(
                run_deletions=deletions,
                run_deletions_total=deletions_total,
                run_deletions_more=deletions_total - len(deletions),
                run_deletions_url=run_deletions_url(run_id),
                run_results=results,
                run_results_total=results_total,
                run_results_more=results_total - len(results),
                run_results_url=run_checks_url(run_id),
                history_per_token=settings.TOKEN_HISTORY_PER_TOKEN,
            )
        return super().change_view(request, object_id, form_url, extra_context=context)


def _int_or_none(value: str) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def run_deletions_url(run_id: int) -> str:
    return f"{reverse('admin:tokens_tokendeletion_changelist')}?run__id__exact={run_id}"


def run_checks_url(run_id: int) -> str:
    return f"{reverse('admin:tokens_tokencheckrecord_changelist')}?run__id__exact={run_id}"


@admin.register(TokenDeletion)
class TokenDeletionAdmin(ReadOnlyAdmin):
    list_display = ("deleted_at", "card_name", "user_name", "token_masked", "reason", "detail", "run", "actor")
    list_filter = ("reason",)
    search_fields = ("card_name", "user_name")
    list_select_related = ("run", "actor")
    raw_id_fields = ("run", "actor")
    date_hierarchy = "deleted_at"
    readonly_fields = ("recent_checks",)

    @admin.display(description=_("the token's last checks"))
    def recent_checks(self, obj: TokenDeletion) -> SafeString:
        return render_recent_checks(obj.token_pk)


@admin.register(TokenCheckRecord)
class TokenCheckRecordAdmin(ReadOnlyAdmin):
    """Every stored per-token check (the run page lists its first ones and links here)."""

    list_display = ("checked_at", "token_pk", "outcome", "message", "http_status", "run")
    list_filter = ("outcome",)
    list_select_related = ("run",)
    raw_id_fields = ("run",)
    ordering = ("-checked_at", "-id")
    list_per_page = 200
    show_full_result_count = False
