"""Business logic of the token keep-alive. Tasks, admin and commands only call these."""
