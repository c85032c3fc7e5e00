# Rows the constraints of 0003 would refuse are settled first, in a migration of their own (on
# PostgreSQL, data changes and ALTER TABLE in one transaction can fail on pending trigger events).

from django.db import migrations


OPEN = ["pending", "active", "transferring", "failed"]


def settle_rows_the_new_constraints_refuse(apps, schema_editor):
    """Existing rows that the new constraints would refuse are settled, each with an event.

    - pending leases with a join time never joined in this system: the times are cleared;
    - an entitlement shorter than the term becomes one term;
    - an email with several open leases (the legacy import allowed one per team) keeps its newest
      one; the older ones are cancelled with an event saying the seat was NOT freed at the
      provider, so the orphan check shows where the member still sits.
    """
    from django.db.models import F
    from django.db.models.functions import Lower
    from django.utils import timezone

    MemberLease = apps.get_model("leases", "MemberLease")
    LeaseEvent = apps.get_model("leases", "LeaseEvent")
    MemberLease.objects.filter(status="pending", joined_at__isnull=False).update(joined_at=None, expires_at=None)
    MemberLease.objects.filter(total_months__lt=F("term_months")).update(total_months=F("term_months"))
    now = timezone.now()
    newest_by_email = {}
    rows = (
        MemberLease.objects.filter(status__in=OPEN)
        .annotate(email_key=Lower("email"))
        .order_by("email_key", "-created_at", "-pk")
        .values_list("pk", "email_key", "status")
    )
    for pk, email_key, status in rows.iterator():
        if email_key not in newest_by_email:
            newest_by_email[email_key] = pk
            continue
        MemberLease.objects.filter(pk=pk).update(
            status="cancelled", transfer_team=None, transfer_step="", claimed_until=None, claimed_by=""
        )
        LeaseEvent.objects.create(
            lease_id=pk,
            action="cancelled",
            from_status=status,
            to_status="cancelled",
            created_at=now,
            detail={
                "reason": "upgrade: a second open lease of this email",
                "kept_lease": newest_by_email[email_key],
                "seat_freed": False,
            },
        )



class Migration(migrations.Migration):

    dependencies = [
        ('leases', '0001_initial'),
    ]

    operations = [
        migrations.RunPython(settle_rows_the_new_constraints_refuse, migrations.RunPython.noop),
    ]
