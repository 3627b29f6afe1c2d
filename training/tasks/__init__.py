"""Task heads, one file each (head + loss + metrics + sample mapping). Import them all here."""
from training.tasks import retrieval  # noqa: F401
