"""`coincide-ray`: the command line. Builds a JobConfig from YAML + flags and calls the library."""

from __future__ import annotations

import argparse
import sys

from coincide_ray import io
from coincide_ray.config import ConfigError, JobConfig, load_yaml, merge

SELECT_EXAMPLES = """examples:
  coincide-ray select --embeddings out/embeddings --output out --fraction 0.2 --clusters 2500 --layers 3,7,11,15,19
  coincide-ray select --embeddings s3://bucket/run/embeddings --output s3://bucket/run --config job.yaml
"""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user must fix something: reported as one line, exit 2."""
    from coincide_ray.pipeline import InputError
    from coincide_ray.schema import SchemaError

    errors: list[type[BaseException]] = [ConfigError, InputError, SchemaError, FileNotFoundError, PermissionError]
    try:
        from botocore.exceptions import NoCredentialsError, EndpointConnectionError

        errors += [NoCredentialsError, EndpointConnectionError]
    except ImportError:
        pass
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coincide-ray",
        description="COINCIDE data selection for vision-language instruction tuning.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    select = commands.add_parser(
        "select",
        help="k-means + COINCIDE selection over finished embeddings",
        description="Cluster the embeddings, score clusters, spread the budget and rank by greedy MMD; "
        "writes clusters/, selection/ and manifest.json under --output.",
        epilog=SELECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    select.add_argument("--embeddings", metavar="URI", help="Parquet file or folder with sample_id, embedding")
    select.add_argument("--output", metavar="URI", help="local folder or s3:// prefix for the outputs")
    select.add_argument("--fraction", type=float, metavar="F", help="share of accepted records to select (default 0.2)")
    select.add_argument("--clusters", type=int, metavar="K", help="number of k-means clusters (default 1000)")
    select.add_argument("--layers", metavar="L,L,...", help="decoder layers the embeddings came from (default 3,7,11,15,19)")
    select.add_argument("--iterations", type=int, metavar="N", help="k-means iterations (default 50)")
    select.add_argument("--seed", type=int, metavar="S", help="k-means seed (default 1234)")
    select.add_argument("--temperature", type=float, metavar="TAU", help="softmax temperature of the budget (default 0.1)")
    select.add_argument("--config", metavar="YAML", help="job config file; flags override its keys")
    return parser


def config_from_args(args: argparse.Namespace) -> JobConfig:
    base = load_yaml(io.read_bytes(args.config).decode()) if args.config else {}
    flags = {
        "output": args.output,
        "embeddings": args.embeddings,
        "layers": args.layers,
        "cluster": {"clusters": args.clusters, "iterations": args.iterations, "seed": args.seed},
        "select": {"fraction": args.fraction, "temperature": args.temperature},
    }
    values = merge(base, flags)
    if not values.get("output"):
        raise ConfigError("--output is required (or output: in the config file)")
    return JobConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if args.command == "select":
            from coincide_ray.pipeline import run_select

            run_select(config)
    except user_errors() as error:
        print(f"coincide-ray: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
