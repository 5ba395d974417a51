"""`coincide-ray`: the command line. Builds a JobConfig from YAML + flags and calls the library."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading

from coincide_ray import io, schema
from coincide_ray.config import ConfigError, JobConfig, load_yaml, merge
from coincide_ray.pipeline import stderr_progress

EMBED_EXAMPLES = """examples:
  coincide-ray embed --input data/llava_v1_5_mix665k.json --image-root data/images --model models/tinyllava \\
      --output runs/665k --layers 3,7,11,15,19
  coincide-ray embed --input s3://bucket/vflan/annotation.jsonl --image-root s3://bucket/vflan/images/ \\
      --model s3://bucket/models/tinyllava --output s3://bucket/runs/vflan --config job.yaml
"""

RUN_EXAMPLES = """examples:
  coincide-ray run --input data/records.json --image-root data/images --model models/tinyllava \\
      --output runs/first --fraction 0.2 --clusters 2500 --layers 3,7,11,15,19
  coincide-ray run --config job.yaml --output s3://bucket/runs/2026-11-23
"""

CONVERT_EXAMPLES = """examples:
  coincide-ray convert tinyllava --source checkpoints/TinyLLaVA-2.0B --output models/tinyllava-2.0b-hf
  coincide-ray convert tinyllava --source s3://bucket/TinyLLaVA-2.0B --output s3://bucket/models/tinyllava-2.0b-hf
"""

SELECT_EXAMPLES = """examples:
  coincide-ray select --embeddings out/embeddings --output out --fraction 0.2 --clusters 2500 --layers 3,7,11,15,19
  coincide-ray select --embeddings s3://bucket/run/embeddings --output s3://bucket/run --config job.yaml
"""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user must fix something: reported as one line, exit 2."""
    from coincide_ray.cluster.stage import ShardsLost
    from coincide_ray.embed.convert import ConvertError
    from coincide_ray.embed.model import ModelError
    from coincide_ray.embed.stage import ResourcesUnavailable
    from coincide_ray.embeddings import MixedDimensionsError
    from coincide_ray.io import InputFormatError, StorageError
    from coincide_ray.manifest import OutputBusy
    from coincide_ray.pipeline import InputError
    from coincide_ray.schema import SchemaError
    from coincide_ray.select.strategies import RankingTooShort

    errors: list[type[BaseException]] = [ConfigError, ConvertError, InputError, InputFormatError, ModelError,
                                         SchemaError, StorageError, MixedDimensionsError, ResourcesUnavailable,
                                         RankingTooShort, ShardsLost, OutputBusy, FileNotFoundError,
                                         PermissionError]
    try:
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError

        errors += [NoCredentialsError, EndpointConnectionError]
    except ImportError:
        pass
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coincide-ray",
        description="COINCIDE data selection for vision-language instruction tuning.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", metavar="URI", help="local folder or s3:// prefix for the outputs")
    common.add_argument("--layers", metavar="L,L,...", help="decoder layers to pool (default 3,7,11,15,19)")
    common.add_argument("--config", metavar="YAML", help="job config file; flags override its keys")
    common.add_argument("--address", metavar="ADDR",
                        help="Ray cluster to join (default: RAY_ADDRESS, as under `ray job submit`; "
                             "without either, a new local Ray of the run's own, without the dashboard)")
    common.add_argument("--dry-run", action="store_true",
                        help="print the plan (stages, records, work, memory) and write nothing")
    common.add_argument("--verbose", action="store_true",
                        help="also show Ray Data's own progress table (also: COINCIDE_RAY_DATA_PROGRESS=1)")
    common.add_argument("--calibrate", type=int, metavar="N", default=0,
                        help="with --dry-run: embed N records here to measure samples/s and project the total")
    sources = argparse.ArgumentParser(add_help=False)
    sources.add_argument("--input", metavar="URI", help="records: LLaVA JSON list, JSON Lines or Parquet (file or folder)")
    sources.add_argument("--image-root", metavar="URI", help="folder or s3:// prefix the records' image paths are under")
    sources.add_argument("--model", metavar="URI", help="image-text-to-text checkpoint folder (local or s3://)")
    sources.add_argument("--device", choices=("auto", "gpu", "cpu"),
                         help="where the model runs (default auto: gpu when the cluster has or can add GPUs)")
    sources.add_argument("--label-field", metavar="FIELD[,FIELD]",
                         help="record fields with known labels: the report shows cluster purity and label coverage")
    sources.add_argument("--previous", metavar="URI",
                         help="a finished earlier run: unchanged records reuse its vectors; the selection is diffed")
    budget = argparse.ArgumentParser(add_help=False)
    budget.add_argument("--fraction", type=float, metavar="F", help="share of accepted records to select (default 0.2)")
    budget.add_argument("--clusters", type=int, metavar="K", help="number of k-means clusters (default 1000)")
    budget.add_argument("--iterations", type=int, metavar="N", help="k-means iterations (default 50)")
    budget.add_argument("--seed", type=int, metavar="S", help="k-means seed (default 1234)")
    budget.add_argument("--kmeans-sample", type=float, metavar="F",
                        help="fit the centroids on this share of the rows, then assign all (default 1: all rows)")
    budget.add_argument("--temperature", type=float, metavar="TAU", help="softmax temperature of the budget (default 0.1)")
    budget.add_argument("--compare-with", metavar="URI",
                        help="a finished run whose purity, collapsed pairs and label coverage the report shows "
                             "beside this run's")
    budget.add_argument("--strategy", metavar="NAME[,NAME...]",
                        help="also write these subsets under selection/<name>/: coincide, random, no-transfer, "
                             "no-density, uniform, coincide-random-within (the paper's ablations)")
    budget.add_argument("--warm-start", action="store_true", default=None,
                        help="start k-means from --previous's centroids (steadier, but history-dependent)")

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter
    commands.add_parser(
        "run", parents=[common, sources, budget], help="every stage: embed, cluster, select",
        description="Embed every record, then cluster and select; finished work under --output is reused.",
        epilog=RUN_EXAMPLES, formatter_class=formatter,
    )
    commands.add_parser(
        "embed", parents=[common, sources], help="the small LVLM over every record -> embeddings/",
        description="Run the model over every record (image + whole conversation) and write "
        "embeddings/part-*.parquet under --output, one file per input block; blocks already written are skipped.",
        epilog=EMBED_EXAMPLES, formatter_class=formatter,
    )
    select = commands.add_parser(
        "select", parents=[common, budget], help="k-means + COINCIDE selection over finished embeddings",
        description="Cluster the embeddings, score clusters, spread the budget and rank by greedy MMD; "
        "writes clusters/, selection/ and manifest.json under --output.",
        epilog=SELECT_EXAMPLES, formatter_class=formatter,
    )
    select.add_argument("--embeddings", metavar="URI",
                        help="Parquet file or folder with sample_id, embedding (default: <output>/embeddings)")
    select.add_argument("--previous", metavar="URI",
                        help="a finished earlier run: the selection is diffed against it (and --warm-start)")
    convert = commands.add_parser(
        "convert", help="turn the paper's TinyLLaVA-2.0B folder into a transformers-native checkpoint",
        description="Rewrite a checkpoint in the original TinyLLaVA-2.0B layout (local or s3://) as a "
        "LlavaForConditionalGeneration folder that --model accepts. Tensors are carried over bit for bit.",
        epilog=CONVERT_EXAMPLES, formatter_class=formatter,
    )
    convert.add_argument("family", choices=["tinyllava"], help="the source format")
    convert.add_argument("--source", required=True, metavar="URI", help="the TinyLLaVA-2.0B folder")
    convert.add_argument("--output", required=True, metavar="DIR", help="a new folder or s3:// prefix")
    convert.add_argument("--vision-config", metavar="URI",
                         help="the tower's config.json or its folder (default: SigLIP-so400m at 384 px)")
    convert.add_argument("--vision-tower", metavar="URI",
                         help="the published SigLIP tower folder the source's mm_vision_tower names: its weights "
                              "are used, as the authors' loader does, and compared with the copy inside the "
                              "source (default: that copy)")
    return parser


def run_convert(args: argparse.Namespace) -> None:
    from coincide_ray.embed.convert import convert_tinyllava

    done = convert_tinyllava(args.source, args.output, args.vision_config, progress=stderr_progress,
                             vision_tower=args.vision_tower)
    print(f"{done.output}: {done.tensors} tensors ({done.bytes / 2**30:.2f} GiB) carried over bit for bit; "
          f"{done.image_tokens} image tokens per image")


def config_from_args(args: argparse.Namespace) -> JobConfig:
    base = load_yaml(io.read_bytes(args.config).decode()) if args.config else {}
    given = vars(args)
    flags = {
        "output": args.output,
        "input": given.get("input"),
        "image_root": given.get("image_root"),
        "model": given.get("model"),
        "embeddings": given.get("embeddings"),
        "previous": given.get("previous"),
        "compare_with": given.get("compare_with"),
        "label_fields": given.get("label_field"),
        "layers": args.layers,
        "cluster": {"clusters": given.get("clusters"), "iterations": given.get("iterations"), "seed": given.get("seed"),
                    "sample_fraction": given.get("kmeans_sample"), "warm_start": given.get("warm_start")},
        "select": {"fraction": given.get("fraction"), "temperature": given.get("temperature"),
                   "strategies": given.get("strategy")},
        "embed": {"device": given.get("device")},
    }
    values = merge(base, flags)
    for key in ("output", "input", "image_root", "model", "embeddings", "previous", "compare_with"):
        if values.get(key):
            values[key] = io.absolute(values[key])
    if not values.get("output"):
        raise ConfigError("--output is required (or output: in the config file)")
    if io.is_file(values["output"]):
        raise ConfigError(f"--output {values['output']} is a file; it must name a folder or prefix")
    if args.command in ("run", "select") and not values.get("embeddings"):
        values["embeddings"] = io.join(values["output"], schema.EMBEDDINGS_DIR)
    return JobConfig.from_dict(values)


def check_sources(config: JobConfig, command: str) -> None:
    """Every path the run will read exists, checked before Ray starts: a typo is one line
    now, not a failure after the embedding pass."""
    from coincide_ray.embed.model import check_weights

    def must_exist(uri: str | None, flag: str) -> None:
        if uri and not io.exists(uri):
            raise ConfigError(f"{flag} {uri}: no such file or folder")

    must_exist(config.input, "--input")
    if command in ("run", "embed"):
        must_exist(config.image_root, "--image-root")
    else:
        must_exist(config.embeddings, "--embeddings")
    must_exist(config.previous, "--previous")
    if config.compare_with and not io.exists(io.join(config.compare_with, schema.MANIFEST_PATH)):
        raise ConfigError(f"--compare-with {config.compare_with}: no finished run there (no {schema.MANIFEST_PATH})")
    if command in ("run", "embed") and config.model:
        check_weights(config.model, config.embed.trust_remote_code)  # headers and shapes, one line


def ray_address(flag: str | None) -> str:
    """--address, else RAY_ADDRESS (set by `ray job submit`), else "local": a new Ray of our
    own. ray.init() without an address would join whatever Ray was started last on this
    machine, another user's included."""
    return flag or os.environ.get("RAY_ADDRESS") or "local"


def start_ray(address: str | None = None) -> bool:
    """Start or join Ray unless this process already has; whether it did."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    address = ray_address(address)
    # A Ray of the run's own ends with the run, and its dashboard with it: not started, it saves
    # every such run about 3 CPU-seconds. A run to watch joins a head (`ray start --head`).
    # None, Ray's default, when joining: a cluster's dashboard is its head's business.
    ray.init(address=address, logging_level=logging.WARNING,
             include_dashboard=False if address == "local" else None)
    return True


def show_ray_data_progress(show: bool) -> None:
    """Ray Data's operator table on or off. Off by default: under `ray job submit` or any
    non-interactive stdout it is logged as a 12-line table every few seconds, which buries
    our own line per block."""
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = show
    if not show:  # nor its three lines per dataset (started, plan, finished), nor the one saying bars are off
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived (Ctrl-C, a scheduler, `ray job stop`). A BaseException, as
    KeyboardInterrupt is: no `except Exception` on the way (Ray Data's among them) logs it
    as a failure or swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


def on_stop_signals():
    """Route SIGINT and SIGTERM to Stopped in the main thread; installed after Ray starts,
    whose core worker otherwise answers SIGTERM with a C++ stack dump. Returns the handlers
    to put back, or {} off the main thread (signals cannot be caught there)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            run_convert(args)
            return 0
        config = config_from_args(args)
        check_sources(config, args.command)
        if args.dry_run:
            from coincide_ray.plan import plan

            for line in plan(config, args.command, calibrate=args.calibrate):
                print(line)
            return 0
        started = start_ray(args.address)
        show_ray_data_progress(args.verbose or os.environ.get("COINCIDE_RAY_DATA_PROGRESS") == "1")
        handlers = on_stop_signals()
        stopped_by = None
        try:
            run_stages(args, config)
        except Stopped as stop:
            stopped_by = stop.signum  # not the exception: its traceback holds the frames collected below
        finally:
            from coincide_ray.manifest import stop_heartbeats

            stop_heartbeats()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if stopped_by is not None:
            # The stopped frames still hold Ray Data's executor. Collected now, while Ray is
            # connected, it cancels its tasks quietly; left to the exit, after Ray's own
            # shutdown, it printed "Ray is not initialized" tracebacks (seen under load).
            gc.collect()
            if started:
                import ray

                ray.shutdown()
            # After Ray's shutdown: a line Ray's log stream still held (an actor's retry being
            # cancelled) came after this one under load, and the last line is what a user reads.
            print(f"coincide-ray: stopped by {signal.Signals(stopped_by).name}; every finished block and stage is "
                  "kept, and the same command resumes", file=sys.stderr, flush=True)
            return 128 + stopped_by
    except user_errors() as error:
        cause = getattr(error, "cause", None) or error  # raised in a Ray worker: its own message, not the trace
        print(f"coincide-ray: error: {cause}", file=sys.stderr)
        return 2
    return 0


def run_stages(args: argparse.Namespace, config: JobConfig) -> None:
    """The stages the command asks for, in order."""
    embed = None
    if args.command in ("run", "embed"):
        from coincide_ray.embed.stage import run_embed
        from coincide_ray.pipeline import EmbedStats

        result = run_embed(config, progress=stderr_progress)
        embed = EmbedStats(result.embedded, round(result.seconds, 3), result.truncated, result.resources,
                           result.reused_here, result.reused_previous)
        if args.command == "embed":
            from coincide_ray.manifest import clear_in_progress

            clear_in_progress(config.output)
    if args.command in ("run", "select"):
        from coincide_ray.pipeline import run_select

        run_select(config, embed=embed)


if __name__ == "__main__":
    sys.exit(main())
