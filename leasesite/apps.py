from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class LeasesiteConfig(AppConfig):
    name = "leasesite"
    verbose_name = _("Operations")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from leasesite import checks  # noqa: F401 - registers the system checks of the secrets at rest
        from leasesite.schedules import install_schedules_after_migrate

        post_migrate.connect(install_schedules_after_migrate, sender=self)
