from __future__ import annotations

import json

import pytest
from django.core.management import call_command
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from leasesite.schedules import DEFAULT_SCHEDULES, schedules_install

pytestmark = pytest.mark.django_db

NAMES = {item.key: item.name for item in DEFAULT_SCHEDULES}  # English key -> the installed (zh-hans) name

EXPECTED = {
    "tokens: refresh tokens used within 7 days": ("tokens.refresh_tokens", {"max_age_days": 7}),
    "tokens: refresh all tokens": ("tokens.refresh_tokens", {"max_age_days": None}),
    "tokens: clean up tokens unused for 30 days": ("tokens.cleanup_tokens", {"days": 30}),
    "leases: join sync": ("leases.sync_joins", {}),
    "leases: transfer due leases": ("leases.run_transfers", {}),
    "leases: orphan check": ("leases.check_orphans", {}),
}


def test_migrate_installed_the_default_schedules(settings):
    by_name = {t.name: t for t in PeriodicTask.objects.select_related("interval", "crontab")}
    tasks = {key: by_name[name] for key, name in NAMES.items()}
    for name, (task, kwargs) in EXPECTED.items():
        assert tasks[name].task == task
        assert json.loads(tasks[name].kwargs) == kwargs
        assert tasks[name].expire_seconds
    every_6h = tasks["tokens: refresh tokens used within 7 days"].interval
    assert (every_6h.every, every_6h.period) == (360, IntervalSchedule.MINUTES)
    daily = tasks["tokens: refresh all tokens"].crontab
    assert (daily.minute, daily.hour, daily.day_of_week, str(daily.timezone)) == ("0", "2", "*", settings.TIME_ZONE)
    sunday = tasks["tokens: clean up tokens unused for 30 days"].crontab
    assert (sunday.minute, sunday.hour, sunday.day_of_week) == ("0", "3", "0")
    for name in ("leases: join sync", "leases: transfer due leases"):
        every_5m = tasks[name].interval
        assert (every_5m.every, every_5m.period) == (5, IntervalSchedule.MINUTES)
        assert tasks[name].expire_seconds <= 600
    assert tasks["leases: orphan check"].interval.every == 60


def test_setup_schedules_is_idempotent_and_keeps_operator_changes(capsys):
    task = PeriodicTask.objects.get(name=NAMES["tokens: refresh all tokens"])
    task.enabled = False
    task.save()
    count = PeriodicTask.objects.count()
    call_command("setup_schedules")
    assert "0 created" in capsys.readouterr().out
    assert PeriodicTask.objects.count() == count
    assert PeriodicTask.objects.get(name=NAMES["tokens: refresh all tokens"]).enabled is False
    PeriodicTask.objects.filter(name=NAMES["tokens: refresh all tokens"]).delete()
    call_command("setup_schedules")
    assert "1 created" in capsys.readouterr().out


def test_schedule_names_are_in_the_operators_language():
    names = set(PeriodicTask.objects.values_list("name", flat=True))
    assert "刷新全部 Token" in names and "同步所有团队的成员" in names
    assert not any(key in names for key in NAMES)


def test_rows_installed_under_the_english_names_are_renamed_keeping_operator_edits():
    """Installs before the names were translated stored the English key as the name."""
    PeriodicTask.objects.filter(name__in=NAMES.values()).delete()
    schedules_install()  # fresh rows, then pretend they are old ones
    for key, name in NAMES.items():
        PeriodicTask.objects.filter(name=name).update(name=key)
    PeriodicTask.objects.filter(name="leases: join sync").update(enabled=False)
    count = PeriodicTask.objects.count()

    created, present = schedules_install()

    assert (created, present) == (0, len(NAMES))
    assert PeriodicTask.objects.count() == count
    assert PeriodicTask.objects.get(name=NAMES["leases: join sync"]).enabled is False
    assert not PeriodicTask.objects.filter(name__in=list(NAMES)).exists()


def test_the_migration_renames_and_reverses(django_db_blocker):
    import importlib

    from django.apps import apps

    migration = importlib.import_module("leasesite.migrations.0005_translated_schedule_names")
    name = NAMES["tokens: refresh all tokens"]
    PeriodicTask.objects.filter(name=name).update(name="tokens: refresh all tokens")
    migration.rename_forward(apps, None)
    assert PeriodicTask.objects.filter(name=name).exists()
    migration.rename_back(apps, None)
    assert PeriodicTask.objects.filter(name="tokens: refresh all tokens").exists()
    assert not PeriodicTask.objects.filter(name=name).exists()


def test_beat_adds_no_untranslated_result_cleanup_schedule():
    """Results are disabled, so Celery's own ``celery.backend_cleanup`` entry would clean nothing;
    it would only show up in the console as the one schedule not in the operators' language."""
    from django_celery_beat.schedulers import DatabaseScheduler

    from leasesite.celery import app

    # The scheduler's own start-up step, without the scheduler's database connection handling.
    scheduler = DatabaseScheduler.__new__(DatabaseScheduler)
    scheduler.app = app
    installed: dict = {}
    scheduler.update_from_dict = installed.update
    scheduler.install_default_entries({})
    assert "celery.backend_cleanup" not in installed
