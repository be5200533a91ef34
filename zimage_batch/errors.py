"""Errors a user can cause and fix.

Every error here carries a one-paragraph message that names the file, row, column or
variable at fault and says how to fix it. The CLI and the flow print that message and exit
with the error's ``exit_code``; a user never sees a traceback for one of these.

- ``ZImageBatchError``: base class.
  - ``CatalogError``: a catalog that is missing, unreadable, malformed or lacks a column.
  - ``TemplateError``: a template file that is missing, has bad front matter or bad Jinja.
  - ``PlanError``: the plan has problems (collects every problem found, not only the first).
  - ``ModelError``: the model (or a matting backend's weights) cannot be found, downloaded or loaded.
  - ``OutputError``: the output folder cannot be written.
  - ``PresetError``: an unknown preset name, or a presets file that is missing or invalid.
  - ``ImageInputError``: an input image that is missing, not an image, or clashes with another.
  - ``ManifestError``: a manifest that is missing, breaks its schema, or lacks the job asked for.
  - ``SigningError``: a C2PA certificate or key that is missing, mismatched or expired, or
    c2pa-python not installed.
  - ``DeliveryError``: the S3 destination is malformed or cannot be used (missing bucket, wrong
    credentials, unreachable endpoint); the message names the bucket and endpoint, never a secret.
"""

from __future__ import annotations


class ZImageBatchError(Exception):
    """Base class: a problem the user can fix; ``str()`` is the message to show."""

    exit_code = 2


class CatalogError(ZImageBatchError):
    """A catalog file is missing, unreadable or malformed."""


class TemplateError(ZImageBatchError):
    """A template file is missing or invalid."""


class PlanError(ZImageBatchError):
    """The plan has one or more problems; ``problems`` lists each one."""

    def __init__(self, problems: list[str], *, header: str = "The plan has problems; nothing was generated:"):
        self.problems = list(problems)
        shown = self.problems[:50]
        more = len(self.problems) - len(shown)
        lines = [header, *(f"  - {p}" for p in shown)]
        if more:
            lines.append(f"  ... and {more} more.")
        super().__init__("\n".join(lines))


class ModelError(ZImageBatchError):
    """The model cannot be found or loaded."""

    exit_code = 3


class OutputError(ZImageBatchError):
    """The output folder cannot be used."""


class PresetError(ZImageBatchError):
    """A preset name is unknown, or a presets file is missing or invalid."""


class ImageInputError(ZImageBatchError):
    """An input image is missing, unreadable, or would overwrite another input's output."""


class ManifestError(ZImageBatchError):
    """A manifest is missing, does not follow its schema, or lacks the job asked for."""


class SigningError(ZImageBatchError):
    """C2PA signing cannot be set up: certificate, key or the c2pa-python package."""


class DeliveryError(ZImageBatchError):
    """The ``--dest`` S3 destination is malformed, missing or refuses us."""

    exit_code = 4
