"""Task heads, one file each (head + loss + metrics + sample mapping). Import them all here."""
from training.tasks import geo_time, retrieval, time_of_day  # noqa: F401
