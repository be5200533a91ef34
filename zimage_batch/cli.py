"""The ``zimage-batch`` command: a thin edge over the package and the Prefect flow.

Settings are read here once and passed down. Errors a user can fix are printed as one
paragraph with a non-zero exit; tracebacks are only for our own bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import OutputError, ZImageBatchError
from .models import DEFAULT_MODEL

if TYPE_CHECKING:
    from .run import RunConfig

EXAMPLES = """\
examples:
  zimage-batch run catalogs/demo.csv --template templates/product_white.j2 --out out/ --model tiny-random
  zimage-batch run catalogs/demo.parquet --template templates/lifestyle_scene.j2 --model Tongyi-MAI/Z-Image-Turbo --out out/
  zimage-batch run catalogs/demo.csv --template templates/product_white.j2 --out work/ --dest s3://assets-bucket/catalog/2026-11-26
  zimage-batch plan catalogs/demo.csv --template templates/poster_text.j2
  zimage-batch postprocess photos/*.png --preset amazon_main --preset taobao_main --out delivered/
  zimage-batch presets
  zimage-batch verify out/
  zimage-batch reproduce out/ --job 3f9c2a1be0d4 --out repro/
"""

RUN_EXAMPLES = EXAMPLES + """  zimage-batch run catalogs/demo.csv -t templates/poster_text.j2 --out out/ --c2pa-cert certs/chain.pem --c2pa-key certs/signer.key
"""

VERIFY_EXAMPLES = """examples:
  zimage-batch verify out/
  zimage-batch verify out/ --c2pa-trust certs/ca.pem     # also require C2PA signatures from this CA
  zimage-batch verify s3://assets-bucket/catalog/2026-11-26  # what a run delivered with --dest

exit status: 0 when every file holds; 1 when any is missing, altered, stripped of its metadata,
badly signed, or not in the manifest (each listed with the reason); 2 for a bad manifest or path;
4 when an s3:// prefix cannot be read (credentials, endpoint, bucket).
"""

REPRODUCE_EXAMPLES = """examples:
  zimage-batch reproduce out/ --job 3f9c2a1be0d4 --out repro/
  zimage-batch reproduce out/ --job 3f9c2a1be0d4 --out repro/ --model /models/z-image-turbo   # a local model folder

exit status: 0 when every output is byte- or pixel-identical to the original, 1 when any differs
(PSNR and perceptual hash distance are reported), 2 for a bad manifest, job id or --out, 3 for a model
that cannot be loaded.
"""


POSTPROCESS_EXAMPLES = """\
examples:
  zimage-batch postprocess photos/*.png --preset amazon_main --preset taobao_main --out delivered/
  zimage-batch postprocess shoot/*.jpg --preset square_1080 --preset story_1080x1920 --out campaign/
  zimage-batch postprocess photos/*.png --preset amazon_tight --presets-file my_presets.toml --out delivered/
  zimage-batch postprocess photos/*.jpg --preset amazon_main --matting birefnet:models/BiRefNet-general-epoch_244.onnx --out delivered/

writes OUT/<preset>/<input stem>.<ext>, OUT/rejected/<preset>/ (with a .reasons.txt per file) and
OUT/postprocess.jsonl (one record per input and preset). Exit status 0 when every file was delivered,
1 when any input was rejected, 2 for a bad input (image, preset, --out), 3 for matting weights that
cannot be loaded.
"""

DEST_HELP = """
delivering to S3 (--dest s3://BUCKET/PREFIX):
  Every image goes to PREFIX/images/<sku>/<template>/<file> (its path under --out) with a <file>.json record
  beside it, then PREFIX/manifest.jsonl, manifest.parquet (with the `current` column), run.json and
  report.html. Uploads are create-only and checksummed; an existing object with other content is
  reported as a conflict, never overwritten. Rerunning uploads only what is missing; with a fresh --out, jobs already at the destination are skipped, not regenerated.
  Endpoint: AWS_ENDPOINT_URL (unset: AWS). Credentials: AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY
  (+ AWS_SESSION_TOKEN), or AWS_PROFILE. Region: AWS_REGION (default us-east-1).
"""

SERVE_EXAMPLES = """\
examples:
  zimage-batch serve --catalog 'catalogs/demo*.csv' -t templates/product_white.j2 --out /data/nightly \\
      --model Tongyi-MAI/Z-Image-Turbo --cron "0 2 * * *" --timezone Europe/Berlin
  prefect deployment run catalog-run/campaign \\
      --param config='{"catalogs": ["/data/spring.csv"], "templates": ["/srv/zimage-batch/templates/poster_text.j2"],
                       "out": "/data/spring"}'
  (a campaign's paths are read where serve runs: give them absolute)
"""

EXIT_REJECTED = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-batch",
        description="Turn product catalogs into marketplace images with Z-Image-Turbo, with a provenance manifest for every image.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zimage-batch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def engine_options(p: argparse.ArgumentParser) -> None:  # how the pipeline runs: the same for run and serve
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the transformer's repeated blocks and the VAE decoder (CUDA; default: on there; "
                            "a batch of a new shape compiles first, ~50 s on a fresh machine, ~15 s with Inductor's "
                            "on-disk cache; "
                            "never with --vram below 16, whose int8 weights run faster eager)")
        p.add_argument("--vram", type=int, metavar="GB", dest="vram_gb",
                       help="fit a GPU memory budget (12..200): below 40 the text encoder streams from CPU memory while "
                            "a shard's prompts encode and batches hold 1 image (16 GB cards: 13.75 GiB peak, 0.89 s per 1024px image on an H100); "
                            "below 16 the transformer's weights are also int8, not compiled (12 GB cards: 9.2 GiB, 1.65 s "
                            "per 1024px image on an H100; needs torchao; pixels change slightly)")
        p.add_argument("--precision", choices=["bf16", "fp8"], default="bf16",
                       help="fp8: the transformer's block layers in float8 on GPUs with FP8 tensor cores (Ada, Hopper; "
                            "needs torchao): 0.578 s per 1024px image on an H100 vs 0.800 in bf16; it changes pixels, so it is off by default "
                            "(the CPU always computes in fp32)")

    def run_options(p: argparse.ArgumentParser) -> None:  # how a run goes: the same for run and serve's nightly run
        p.add_argument("--dest", metavar="S3_URI", help="also deliver to s3://BUCKET/PREFIX (see 'delivering to S3' in run --help)")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
        p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
        p.add_argument("--shard-size", type=int, default=64, help="jobs per Prefect task (default 64)")
        p.add_argument("--max-attempts", type=int, default=3, help="tries per image when it comes out black/blank (default 3)")
        engine_options(p)
        p.add_argument("--workers", type=int, metavar="N",
                       help="run shards on a local Dask cluster of N worker processes (on a GPU host: one per GPU, each seeing only its own)")
        p.add_argument("--cluster", metavar="ADDRESS", help="run shards on a running Dask scheduler, e.g. tcp://scheduler:8786")
        p.add_argument("--c2pa-cert", metavar="PEM", help="sign every file with C2PA: certificate chain, signing certificate "
                       "first (issued by a CA, emailProtection or documentSigning usage); needs --c2pa-key and c2pa-python")
        p.add_argument("--c2pa-key", metavar="PEM", help="the signing certificate's unencrypted private key")
        p.add_argument("--verify-files", action="store_true",
                       help="re-hash every finished file (SHA-256) to decide it is done; by default a file whose size "
                            "and modification time match the manifest is trusted without reading it")
        p.add_argument("--presets-file", metavar="FILE", help="a TOML/YAML file of extra presets templates may name (see `zimage-batch presets`)")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("catalogs", nargs="+", metavar="CATALOG",
                       help="CSV (UTF-8) or Parquet catalog file(s), a quoted glob pattern such as 'catalogs/*.csv' "
                            "(local paths only; expanded at each run, in name order), or s3://BUCKET/KEY named in "
                            "full; each needs a 'sku' column")
        p.add_argument("-t", "--template", dest="templates", action="append", required=True, metavar="FILE",
                       help="a prompt template (.j2); repeat for several: every template runs over every row")
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"hub id, local diffusers folder, 'tiny-random' (offline test model, noise images) or "
                            f"'simulated:SECONDS' (no model: a stand-in that sleeps SECONDS per image, for trying the "
                            f"machinery around the GPU); default {DEFAULT_MODEL}")
        p.add_argument("--size", help="override every template's size, WIDTHxHEIGHT, e.g. 512x512 (multiples of 16, "
                                     "each side 256..2048)")
        p.add_argument("--steps", type=int, help="override every template's steps (Z-Image-Turbo: 8)")
        p.add_argument("--strict", action="store_true", help="stop before generating anything if any row has a problem")
        p.add_argument("--limit", type=int, help="plan only the first N jobs (for a quick try)")

    run = sub.add_parser("run", help="generate, post-process and store images, with a manifest",
                         description="Generate images for every catalog row x template, post-process them to the "
                                     "template's presets and store them under --out with manifest.jsonl, "
                                     "manifest.parquet, run.json and report.html (a contact sheet). Rerunning the same "
                                     "command resumes, and a run over a changed catalog makes only new or changed "
                                     "products: finished jobs are skipped. Every file carries its provenance (IPTC "
                                     "DigitalSourceType XMP, A1111 parameters, job id); --c2pa-cert/--c2pa-key also sign "
                                     "it with C2PA. With --dest, every image also goes to S3.",
                         epilog=RUN_EXAMPLES + DEST_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(run)
    run.add_argument("--out", required=True, help="output folder (created if missing)")
    run_options(run)
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    serve = sub.add_parser("serve", help="serve the nightly-catalog (scheduled) and campaign (on demand) deployments",
                           description="Serve two Prefect deployments of the catalog-run flow from this process: "
                                       "nightly-catalog (on a cron schedule in a time zone, over --catalog/--template "
                                       "into --out) and campaign (run on demand, with its config as parameters). Uses "
                                       "PREFECT_API_URL when set, else a local Prefect server it starts (its address is "
                                       "printed). Runs until stopped (Ctrl+C).",
                           epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--catalog", dest="catalogs", action="append", required=True, metavar="CATALOG",
                       help="the nightly catalog: a file or a quoted glob pattern, expanded at each run (repeatable)")
    serve.add_argument("-t", "--template", dest="templates", action="append", required=True, metavar="FILE",
                       help="a prompt template for the nightly run (repeatable)")
    serve.add_argument("--out", required=True, help="the nightly run's output folder")
    serve.add_argument("--model", default=DEFAULT_MODEL, help=f"the nightly run's model (default {DEFAULT_MODEL})")
    serve.add_argument("--size", help="override every template's size, WIDTHxHEIGHT (multiples of 16, each side 256..2048)")
    serve.add_argument("--steps", type=int, help="override every template's steps (Z-Image-Turbo: 8)")
    run_options(serve)
    serve.add_argument("--cron", default="0 2 * * *", help="when the nightly run starts (default '0 2 * * *': 02:00)")
    serve.add_argument("--timezone", default="UTC", help="the cron's time zone, e.g. Europe/Berlin (default UTC)")
    serve.add_argument("--concurrency", dest="concurrency", type=int, default=1, metavar="N",
                       help="flow runs at once, nightly and campaigns together (default 1: one GPU)")
    serve.add_argument("--limit", dest="old_limit", type=int, help=argparse.SUPPRESS)  # its old name: refused, see cmd_serve

    plan = sub.add_parser("plan", help="dry run: expand and check the plan without loading a model",
                          description="Expand catalog rows x templates into jobs and check everything, without "
                                      "loading a model. Prints a summary and sample prompts; --jobs writes every job as JSONL.",
                          epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(plan)
    plan.add_argument("--presets-file", metavar="FILE", help="a TOML/YAML file of extra presets templates may name (see `zimage-batch presets`)")
    plan.add_argument("--jobs", metavar="FILE", help="write every job as one JSON line to FILE")
    plan.add_argument("--show", type=int, default=5, help="how many sample jobs to print (default 5)")

    post = sub.add_parser("postprocess", help="make marketplace files from existing images (no model)",
                          description="Cut each image out onto pure white where a preset asks for it, fit it to each "
                                      "preset's frame, encode it, and check it against the quality gates (plain backdrop, "
                                      "product inside the frame, enlargement within max_upscale, fill ratio, pure-white "
                                      "border, file-size cap, not "
                                      "black/blank). Works on generated images and on a studio's own photos.",
                          epilog=POSTPROCESS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    post.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, WebP, AVIF, TIFF, ...)")
    post.add_argument("-p", "--preset", dest="presets", action="append", required=True, metavar="NAME",
                      help="an output preset; repeat for several (`zimage-batch presets` lists them)")
    post.add_argument("--out", required=True, help="output folder (created if missing)")
    post.add_argument("--presets-file", metavar="FILE", help="a TOML/YAML file adding or replacing presets")
    post.add_argument("--matting", default="classical", metavar="BACKEND",
                      help="how the product is found: 'classical' (default; offline, needs a plain light backdrop), "
                           "'rembg:PATH' (a U^2-Net ONNX file, needs the rembg package) or 'birefnet:PATH' (a BiRefNet "
                           "ONNX file, needs onnxruntime). Weights are never downloaded.")
    post.add_argument("-q", "--quiet", action="store_true", help="print only the summary and the rejected images")

    presets = sub.add_parser("presets", help="list the output presets and their rules",
                             description="Print the presets (shipped, plus --presets-file) with size, fit, background, "
                                         "fill ratio bounds, format, quality and file-size cap.",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets.add_argument("--presets-file", metavar="FILE", help="a TOML/YAML file adding or replacing presets")
    presets.add_argument("--markdown", action="store_true", help="print a Markdown table")
    verify = sub.add_parser("verify", help="check delivered files against the manifest",
                            description="Check every file the manifest lists: present, SHA-256 equal, embedded "
                                        "provenance (XMP DigitalSourceType, A1111 parameters) agreeing with every field of "
                                        "the record (prompt, seeds, size, steps, model, ...), and a valid C2PA signature "
                                        "whose assertion agrees too, where the file is signed. Also lists files that are "
                                        "not in the manifest, and files of records deleted from manifest.jsonl that "
                                        "manifest.parquet still holds. A run still in progress is named as such. Writes nothing.",
                            epilog=VERIFY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("path", metavar="PATH", help="the --out folder of a run, or the s3://BUCKET/PREFIX it delivered to (--dest)")
    verify.add_argument("--c2pa-trust", metavar="PEM", help="trust anchors (CA certificates, PEM): every file must carry a "
                        "C2PA signature that chains to one of them")

    reproduce = sub.add_parser("reproduce", help="regenerate one job from its manifest record and compare",
                               description="Regenerate one job from its manifest record alone (prompt, seed, size, steps, "
                                           "guidance, model), post-process and seal it as the run did, write the files "
                                           "under --out, and report whether each is byte-identical to the original or "
                                           "how far it is (PSNR, perceptual hash distance), naming version differences. "
                                           "The original in RUN_DIR is checked too (missing or altered is said).",
                               epilog=REPRODUCE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    reproduce.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of the run (holds manifest.jsonl)")
    reproduce.add_argument("--job", required=True, help="job id (or a unique prefix of 8+ characters, as in file names)")
    reproduce.add_argument("--out", required=True, help="folder for the reproduced files and reproduce.json (outside RUN_DIR, not another run's folder; "
                           "files there with other bytes are never overwritten)")
    reproduce.add_argument("--model", help="model reference to load instead of the recorded one (needed for a local folder)")
    reproduce.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the recorded device when available, else cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "postprocess":
            return cmd_postprocess(args)
        if args.command == "presets":
            return cmd_presets(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "reproduce":
            return cmd_reproduce(args)
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_run(args)
    except ZImageBatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: finished images are kept; run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `zimage-batch plan ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import check_inputs, plan_jobs, strict_check, summarize
    from .presets import load_presets
    from .store import check_folder

    problem = _out_of_range("--limit", args.limit, 1, None)
    if problem:
        raise ZImageBatchError(problem)
    inputs = check_inputs(args.catalogs, args.templates, args.model, load_presets(args.presets_file), size=args.size, steps=args.steps)
    if args.strict:
        strict_check(inputs)
    print_notes(inputs.notes())
    samples = []
    jobs_file = None
    if args.jobs:
        target = Path(args.jobs)
        if target.is_dir():
            raise OutputError(f"--jobs {target} is a folder. Pass a file path, e.g. {target / 'jobs.jsonl'}.")
        check_folder(target.parent, f"--jobs {target}: its folder")  # the file itself may exist: it is replaced
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        except OSError as exc:
            raise OutputError(f"--jobs {target} cannot be written ({exc.strerror}). Pass a path in a folder you can write to.") from None
        jobs_file = os.fdopen(fd, "w", encoding="utf-8")

    def on_job(job) -> None:
        if len(samples) < args.show:
            samples.append(job)
        if jobs_file is not None:
            jobs_file.write(job.to_json() + "\n")

    limited = _limit(plan_jobs(inputs), args.limit)
    try:
        summary = summarize(limited, on_job)
    except BaseException:
        if jobs_file is not None:
            jobs_file.close()
            Path(tmp).unlink(missing_ok=True)
        raise
    if jobs_file is not None:
        jobs_file.close()
        try:
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise OutputError(f"--jobs {target} cannot be written ({exc.strerror}). Pass another file path.") from None
    for job in samples:
        print(f"{job.job_id[:12]}  {job.sku}  {job.template} v{job.variant}  seed {job.seed}  {job.width}x{job.height}  {job.steps} steps")
        print(f"    {job.prompt[:200]}")
    print(f"\n{summary.jobs} jobs from {summary.rows} rows x {len(inputs.templates)} template(s); model {inputs.model}.")
    if args.jobs:
        print(f"Jobs written to {args.jobs}.")
    _print_problems(summary.problems, summary.problem_count)
    if summary.jobs == 0:  # as `run` says it: a plan with no job is no success
        _print_no_job(summary.problem_count)
        return 2
    return 0


def _limit(items, limit: int | None):
    count = 0
    for item in items:
        if limit is not None and count >= limit:
            return
        if hasattr(item, "job_id"):
            count += 1
        yield item


def prefect_environment() -> None:
    """Quiet, local-first Prefect (and Dask) defaults; a user's own settings win. Call it before
    Prefect or Dask is imported: they read these when they load."""
    if "DASK_LOGGING__DISTRIBUTED" not in os.environ:
        os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"  # no scheduler and worker INFO lines in the terminal
        import dask

        # a lost scheduler is reported once, by the run, not also as the client's reconnect traceback
        dask.config.set({"logging": {"distributed": "warning", "distributed.client": "critical"}})
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if "PREFECT_LOGGING_LEVEL" not in os.environ:
        # Prefect's lines stay out of the terminal (the CLI prints its own) but still reach the Prefect
        # server, so runs that `serve` starts have their logs in the UI
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="zimage-batch-prefect-")


def cmd_run(args: argparse.Namespace) -> int:
    from .run import check_run
    from .store import locked

    config = run_config(args, strict=args.strict, limit=args.limit)
    if config.cluster:  # the cluster's workers run in their own folders: every path they open must be absolute
        config = absolute_paths(config)
    inputs = check_run(config)  # every input problem surfaces here, before a model loads or a file is written
    print_notes(inputs.notes())
    with locked(config.out):  # a second run into this --out stops here, before it loads a model
        return _run(args, config)


def _run(args: argparse.Namespace, config: RunConfig) -> int:
    """The run itself, once its inputs are checked and its --out is locked."""
    prefect_environment()
    if config.cluster:
        from .cluster import cluster_workers

        cluster_workers(config.cluster, config.out)  # fail fast when the scheduler or --out cannot be reached
    from .cluster import check_prefect_api, configured_api, prefect_api

    if config.cluster and not configured_api():
        raise ZImageBatchError(
            "--cluster needs PREFECT_API_URL set to a Prefect server that every Dask worker can reach: the workers "
            "keep talking to the server of the run that first used them, and the local one a run starts ends with it. Start "
            "one (`prefect server start`) and export PREFECT_API_URL=http://HOST:4200/api here and on the workers "
            "(infra/README.md).")

    check_prefect_api(bool(config.cluster))  # a PREFECT_API_URL that does not answer fails here, before any output
    from .generate import fetch_model, memory_profile, pick_device

    device = config.device if config.cluster else pick_device(config.device)  # a cluster's workers pick their own
    if not args.quiet and args.vram_gb is not None:
        where = "" if config.cluster or device != "cpu" else "; on the CPU it saves no memory"
        print(f"--vram {args.vram_gb}: {memory_profile(args.vram_gb)}{where}.", file=sys.stderr)
    if not config.cluster:  # a cluster's workers have their own caches
        fetch_model(config.model)  # an unreachable model fails here, before any output
    # the pipeline loads when the first shard needs it: after planning, so a run with nothing to make loads none
    from flows.catalog_images import run_catalog

    from . import progress

    where = f"{config.workers} Dask workers" if config.workers else config.cluster or device
    bar = progress.ProgressBar(enabled=not args.quiet, device=where)
    with prefect_api(), progress.listening(bar.on_event), bar, stopping_on_ctrl_c():
        summary = run_catalog(config, device)
    print_summary(summary, args.started)
    return summary.exit_code


@contextmanager
def stopping_on_ctrl_c() -> Iterator[None]:
    """A first Ctrl-C while planning stops the run at once (KeyboardInterrupt: nothing runs yet). After
    planning it lets every shard of the run finish the batch in progress (its images are kept and
    recorded): this process's shards see ``STOP``, those on Dask workers the run's stop file
    (``RunPlan.stop_file``); the flow submits no more shards, waits for those in flight, and ends
    with exit 130. Nothing is interrupted mid-call, so no shard goes unseen (a KeyboardInterrupt in
    the middle of submitting one lost it, and it ran to its end). A second Ctrl-C ends the process at
    once. Without this, Ctrl-C waited for whole shards in silence, a second one aborted Python
    mid-shutdown, and a cluster's workers went on with their shards after the run had ended."""
    import signal
    import threading

    from . import progress
    from .shard import STOP

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    stop_file: list[str] = []  # the run's, once it is planned

    def on_planned(event: str, value) -> None:
        if event == "planned" and value.stop_file:
            stop_file.append(value.stop_file)

    def on_ctrl_c(signum, frame) -> None:
        if STOP.is_set():
            print("\nStopped at once: the images finished so far are kept; run the same command again to resume.",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)  # files are written atomically; the next run removes temp files and the reaper the server
        STOP.set()
        if not stop_file:  # still planning: nothing runs yet
            raise KeyboardInterrupt
        try:
            Path(stop_file[0]).touch()
        except OSError:  # --out unwritable: this process's shards still see STOP
            pass
        print("\nStopping after the batch in progress (its images are kept); press Ctrl-C again to stop at once.",
              file=sys.stderr, flush=True)

    STOP.clear()
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with progress.listening(on_planned):
            yield  # an interrupted run raises KeyboardInterrupt here once its shards have ended
    finally:
        signal.signal(signal.SIGINT, previous)
        STOP.clear()
        for path in stop_file:
            Path(path).unlink(missing_ok=True)


def cmd_postprocess(args: argparse.Namespace) -> int:
    from .postprocess_files import postprocess_files
    from .store import check_folder

    check_folder(args.out)  # before any image is read

    def on_record(record) -> None:
        if not args.quiet:
            mark = "ok      " if record.status == "ok" else "REJECTED"
            print(f"{mark} {record.input} -> {record.path}", flush=True)

    summary = postprocess_files(args.images, args.presets, args.out, presets_file=args.presets_file,
                                matting=args.matting, on_record=on_record)
    total = summary.ok + summary.rejected_count
    print(f"\nDone in {summary.seconds:.1f} s: {summary.inputs} image(s) x {len(summary.presets)} preset(s) "
          f"({', '.join(summary.presets)}): {summary.ok} ok, {summary.rejected_count} rejected, of {total}.")
    print(f"Delivered: {summary.out}/<preset>/")
    print(f"Report:    {summary.report}")
    if summary.rejected_count:
        print(f"\n{summary.rejected_count} rejected (kept in {summary.out / 'rejected'}, never delivered):", file=sys.stderr)
        for record in summary.rejected:
            print(f"  - {record.input} for {record.preset}: {'; '.join(record.explanations)}", file=sys.stderr)
        if summary.rejected_count > len(summary.rejected):
            print(f"  ... and {summary.rejected_count - len(summary.rejected)} more (all in {summary.report}).", file=sys.stderr)
        return EXIT_REJECTED
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import load_presets, presets_table

    print(presets_table(load_presets(args.presets_file), markdown=args.markdown))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .signing import read_pem
    from .verify import format_report, open_location, verify

    trust = read_pem(args.c2pa_trust, "--c2pa-trust") if args.c2pa_trust else None
    report = verify(open_location(args.path), trust)
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .generate import load_engine, options_for
    from .reproduce import REPORT, check_model, check_repro_out, find_record, format_report, reproduce
    from .store import write_atomic
    from .verify import open_location, read_manifest

    location = open_location(args.run_dir)
    record = find_record(read_manifest(location), args.job, f"{args.run_dir.rstrip('/')}/manifest.jsonl")
    check_repro_out(args.run_dir, args.out)
    reference = check_model(record, args.model)
    device = args.device or ("cpu" if record.device == "cpu" else "auto")
    print(f"Loading model {reference} ...", file=sys.stderr)
    report = reproduce(record, load_engine(reference, device, options_for(record.precision)), location, args.out)
    write_atomic(Path(args.out) / REPORT, (json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n").encode())
    print(format_report(report))
    return report.exit_code


def cmd_serve(args: argparse.Namespace) -> int:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from .run import check_run

    problems = []
    try:
        ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"--timezone {args.timezone!r} is not a known time zone; use an IANA name such as Europe/Berlin or UTC.")
    from prefect.schedules import Cron

    try:
        Cron(args.cron, timezone="UTC")
    except ValueError:
        problems.append(f"--cron {args.cron!r} is not a cron expression; use five fields, e.g. '0 2 * * *' (02:00 daily).")
    if args.concurrency < 1:
        problems.append(f"--concurrency {args.concurrency} is out of range: use 1 or more.")
    if args.old_limit is not None:  # run --limit plans the first N jobs; serve's meant flow runs at once
        problems.append(f"serve has no --limit: --concurrency {args.old_limit} sets the flow runs at once (its old name was "
                        f"--limit); to try the nightly on the first N jobs, use `zimage-batch run ... --limit N`.")
    if problems:
        raise ZImageBatchError(" ".join(problems))
    config = serve_config(args)
    check_run(config)  # the nightly inputs must be good before anything is served
    prefect_environment()
    import prefect

    from flows.deployments import CAMPAIGN, NIGHTLY, deployments

    from .cluster import prefect_api

    with prefect_api() as url:
        print(f"Serving catalog-run/{NIGHTLY} ({args.cron}, {args.timezone}) and catalog-run/{CAMPAIGN} on {url}.\n"
              f"Trigger a campaign: PREFECT_API_URL={url} prefect deployment run catalog-run/{CAMPAIGN} --param config='{{...}}'. "
              f"Ctrl+C stops.", flush=True)
        prefect.serve(*deployments(config, args.cron, args.timezone), print_starting_message=False, limit=args.concurrency)
    return 0


def serve_config(args: argparse.Namespace) -> RunConfig:
    """The nightly run's config from serve's options, its paths made absolute (runs start in another folder)."""
    return absolute_paths(run_config(args))


def run_config(args: argparse.Namespace, **more) -> RunConfig:
    """The RunConfig of the options run and serve share (``run_options``), plus ``more``; their numbers
    checked first."""
    from .run import RunConfig

    _check_numbers(args)
    if args.workers and args.cluster:
        raise ZImageBatchError("--workers starts a local Dask cluster and --cluster uses a running one: pass one of them.")
    return RunConfig(
        catalogs=args.catalogs, templates=args.templates, out=args.out, model=args.model, device=args.device,
        batch_size=args.batch_size, shard_size=args.shard_size, max_attempts=args.max_attempts, size=args.size,
        steps=args.steps, compile=args.compile, vram_gb=args.vram_gb, precision=args.precision, workers=args.workers,
        cluster=args.cluster, presets_file=args.presets_file, c2pa_cert=args.c2pa_cert, c2pa_key=args.c2pa_key,
        dest=args.dest, verify_files=args.verify_files, **more,
    )


def absolute_paths(config: RunConfig) -> RunConfig:
    """The config with every local path absolute (catalogs, templates, --out, presets and C2PA files, a
    model folder), for runs that start in another folder or on other machines."""
    return config.model_copy(update=dict(
        catalogs=[_absolute(c) for c in config.catalogs], templates=[_absolute(t) for t in config.templates],
        out=_absolute(config.out), presets_file=_absolute(config.presets_file), c2pa_cert=_absolute(config.c2pa_cert),
        c2pa_key=_absolute(config.c2pa_key), model=_absolute(config.model) if os.path.isdir(config.model) else config.model))


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (runs that start in another folder, or on other machines, must find it)."""
    return path if path is None or path.startswith("s3://") else os.path.abspath(path)


def _check_numbers(args: argparse.Namespace) -> None:
    from .generate import VRAM_RANGE

    for flag, value, low, high in (("--batch-size", args.batch_size, 1, 64), ("--shard-size", args.shard_size, 1, 100_000),
                                   ("--max-attempts", args.max_attempts, 1, 10), ("--limit", getattr(args, "limit", None), 1, None),
                                   ("--vram", args.vram_gb, *VRAM_RANGE), ("--workers", args.workers, 1, 256)):
        problem = _out_of_range(flag, value, low, high)
        if problem:
            raise ZImageBatchError(problem)


def _out_of_range(flag: str, value: int | None, low: int, high: int | None) -> str | None:
    if value is not None and (value < low or (high is not None and value > high)):
        return f"{flag} {value} is out of range: use {f'{low}..{high}' if high else f'{low} or more'}."
    return None


def print_notes(notes: list[str]) -> None:
    """Settings that work but are unusual for the model, one line each on stderr."""
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def print_summary(summary, started: float | None = None) -> None:
    """The run's outcome on stdout; ``started`` (perf_counter at the command's start) adds the time with start-up."""
    out = Path(summary.out)
    overall = f" ({time.perf_counter() - started:.1f} s with start-up)" if started is not None else ""
    print(
        f"\nDone in {summary.seconds:.1f} s{overall}: {summary.generated} generated, {summary.skipped} skipped (already "
        f"done), {summary.rejected} rejected, {summary.failed} failed, of {summary.planned} planned jobs "
        f"({summary.pipeline_loads} pipeline load(s))."
    )
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in summary.stage_seconds.items())
    print(f"Time per stage: {stages}.")
    if (out / "images").is_dir():
        print(f"Images:   {out / 'images'}")
    if summary.rejected or summary.still_rejected:
        print(f"Rejected: {out / 'rejected'} (kept for review, never delivered)")
    if summary.still_rejected:
        print(f"Still rejected: {summary.still_rejected} job(s) rejected by earlier runs are not made again; report.html "
              f"lists them (fix the template or preset and rerun, or accept them)")
    if (out / "manifest.jsonl").is_file():
        print(f"Manifest: {out / 'manifest.jsonl'} (and manifest.parquet)")
    print(f"Summary:  {out / 'run.json'}")
    print(f"Report:   {out / 'report.html'} (open it in a browser; works offline)")
    if summary.removed:
        shown = ", ".join(summary.removed[:10]) + (f" ... ({len(summary.removed)} in all)" if len(summary.removed) > 10 else "")
        print(f"Removed:  {len(summary.removed)} product(s) no longer in the catalog: {shown} (their images are kept; see run.json)")
    if summary.re_signed:
        print(f"Re-signed: {summary.re_signed} job(s) made earlier with other C2PA signing (or none) were made again, "
              f"so their files are signed as this run signs.")
    if summary.kept_signature:
        print(f"\nnote: {summary.kept_signature} job(s) delivered earlier with other C2PA signing (or none) keep it: "
              f"delivered files are never overwritten. Deliver to a new prefix to have them signed as this run signs.",
              file=sys.stderr)
    if summary.dest:
        print_delivery(summary)
    _print_problems(summary.problems, summary.row_problems, listed_in="run.json")
    if summary.prompts_cut:
        print(f"\nnote: {summary.prompts_cut} job(s) had a prompt longer than its template's max_sequence_length "
              f"tokens; the text encoder read only its start. Shorten those prompts, or raise max_sequence_length "
              f"in the template's front matter (up to 1024).", file=sys.stderr)
    if summary.planned == 0:
        _print_no_job(summary.row_problems)
    if summary.failed:
        print(f"\n{summary.failed} job(s) failed; see status 'failed' in the manifest. Rerun the same command to retry them.", file=sys.stderr)


def print_delivery(summary) -> None:
    print(f"Delivered: {summary.delivered} job(s), {summary.uploaded_files} image(s), {summary.uploaded_bytes / 1e6:.1f} MB "
          f"to {summary.dest}; {summary.delivery_conflicts} conflict(s), {summary.delivery_failed} failed.")
    if summary.recovered:
        print(f"Recovered: {summary.recovered} job(s) an interrupted run had delivered without recording them "
              f"there: adopted from their sidecars, not made again.")
    if summary.manifest_uri:
        print(f"Published: {summary.manifest_uri} (and manifest.parquet, run.json)")
    if summary.delivery_problems:
        print("\nDelivery problems (local outputs are kept; rerun the same command to deliver what is missing):", file=sys.stderr)
        for problem in summary.delivery_problems[:20]:
            print(f"  - {problem}", file=sys.stderr)
        if len(summary.delivery_problems) > 20:
            print(f"  ... and {len(summary.delivery_problems) - 20} more (listed in run.json).", file=sys.stderr)


def _print_no_job(row_problems: int) -> None:
    why = f"all {row_problems} row(s) have problems (listed above)" if row_problems else "the catalogs have no rows"
    print(f"\nNo job was planned: {why}. Fix the catalog or the templates and run again.", file=sys.stderr)


def _print_problems(problems: list[str], count: int, listed_in: str | None = None) -> None:
    """``count`` row problems, listed as ``problems`` (the same problem on many rows is one line)."""
    if not count:
        return
    print(f"\n{count} row problem(s); those rows were skipped (use --strict to stop instead):", file=sys.stderr)
    for problem in problems[:20]:
        print(f"  - {problem}", file=sys.stderr)
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more" + (f" (listed in {listed_in})." if listed_in else "."), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
