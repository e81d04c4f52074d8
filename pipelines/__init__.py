"""The Beam pipelines of imgindex (`pipelines.embed`)."""

import logging


class _BeamImportNoise(logging.Filter):
    """Beam without its GCP extra warns at import that apitools is missing; nothing here uses it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


_filter = _BeamImportNoise()
logging.getLogger().addFilter(_filter)
try:
    import apache_beam  # noqa: F401
finally:
    logging.getLogger().removeFilter(_filter)
