import secrets

from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand

from accounts.models import Laboratory, User
from accounts.roles import MODEL_ADMIN


class Command(BaseCommand):
    help = "First-run setup: a default laboratory and an administrator whose password is printed once."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--lab", default="Default laboratory")

    def handle(self, *args, **options):
        lab, _ = Laboratory.objects.get_or_create(name=options["lab"])
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("An administrator already exists; no new password was made.")
            return
        password = secrets.token_urlsafe(12)
        user = User.objects.create_superuser(options["username"], email="", password=password, laboratory=lab)
        user.groups.add(Group.objects.get(name=MODEL_ADMIN))
        self.stdout.write(self.style.SUCCESS(f"Created administrator '{user.username}' in '{lab.name}'."))
        self.stdout.write(f"WBC_ADMIN_USERNAME={user.username}")
        self.stdout.write(f"WBC_ADMIN_PASSWORD={password}")
        self.stdout.write("This password is shown only once: write it down, then change it under 'Password'.")
