"""zimage-batch: catalog rows -> Jinja prompts -> Z-Image-Turbo -> marketplace images + provenance manifest."""

__version__ = "0.1.0"
