from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class TokensConfig(AppConfig):
    name = "tokens"
    verbose_name = _("报名工具 tokens")
    default_auto_field = "django.db.models.BigAutoField"
