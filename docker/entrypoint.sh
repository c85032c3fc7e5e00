#!/bin/sh
# web | worker | beat | migrate | any other command
set -e
case "$1" in
  web)
    exec gunicorn leasesite.wsgi:application --bind 0.0.0.0:8000 \
      --workers "${WEB_CONCURRENCY:-3}" --access-logfile - --timeout 60
    ;;
  worker)
    exec celery -A leasesite worker --loglevel="${LOG_LEVEL:-INFO}" \
      --concurrency "${CELERY_CONCURRENCY:-2}"
    ;;
  beat)
    # Exactly one beat per deployment; schedules live in the database (django-celery-beat).
    exec celery -A leasesite beat --loglevel="${LOG_LEVEL:-INFO}" \
      --scheduler django_celery_beat.schedulers:DatabaseScheduler
    ;;
  migrate)
    python manage.py migrate --noinput
    exec python manage.py setup_schedules
    ;;
  *)
    exec "$@"
    ;;
esac
