"""Prefect flows of zimage-batch: thin sequences of tasks; the work lives in ``zimage_batch``."""
