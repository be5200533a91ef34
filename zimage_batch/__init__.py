"""zimage-batch: catalog rows -> Jinja prompts -> Z-Image-Turbo -> marketplace images + provenance manifest."""

__version__ = "0.1.0"


def _source_fingerprint() -> str:
    """12 hex digits of a SHA-256 over the .py and .toml files of this package and the .py files of
    ``flows`` beside it, as they are when the package is imported (and, called again, now): Dask workers are checked against it before a run's first
    shard (``cluster.check_workers``), since the version string stays the same across commits and a
    worker's checkout may have changed since it imported the code it runs."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    here = Path(__file__).parent
    for root in (here, here.parent / "flows"):
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.toml")]):
            digest.update(f"{root.name}/{path.relative_to(root).as_posix()}".encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


SOURCE_FINGERPRINT = _source_fingerprint()
