"""Default periodic tasks installed under their English names get the translated name.

Operators' edits (enabled, interval, arguments) stay: only ``name`` changes. Reversible: the
reverse renames back to the English key. Celery's own ``celery.backend_cleanup`` entry goes:
no results are stored (``CELERY_RESULT_EXPIRES = None`` stops beat adding it again).
"""

from django.db import migrations


def rename_forward(apps, schema_editor):
    from leasesite.schedules import schedules_rename

    periodic_task = apps.get_model("django_celery_beat", "PeriodicTask")
    schedules_rename(periodic_task)
    periodic_task.objects.filter(name="celery.backend_cleanup", task="celery.backend_cleanup").delete()


def rename_back(apps, schema_editor):
    from leasesite.schedules import DEFAULT_SCHEDULES

    periodic_task = apps.get_model("django_celery_beat", "PeriodicTask")
    for item in DEFAULT_SCHEDULES:
        if item.name != item.key and not periodic_task.objects.filter(name=item.key).exists():
            periodic_task.objects.filter(name=item.name).update(name=item.key)


class Migration(migrations.Migration):
    dependencies = [
        ("leasesite", "0004_job_success"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(rename_forward, rename_back)]
