"""The nightly refresh entrypoint for `ray job submit`.

    ray job submit --working-dir . -- python jobs/refresh.py --root s3://bucket/coincide \\
        --input s3://bucket/corpus/ --image-root s3://bucket/corpus/ --model s3://bucket/models/tinyllava \\
        --config job.yaml

Each night writes a complete, self-contained run under <root>/runs/<date> (today in UTC unless
--date is given), reusing the vectors of every unchanged record from the run that
<root>/latest.json points to and diffing the selection against it. latest.json is updated
last, only when the run finished, so a failed night leaves yesterday's run as the latest and
the same command resumes tonight's. Every other flag is passed to `coincide-ray run`.
"""

from __future__ import annotations

import argparse
import datetime
import sys

from coincide_ray import io
from coincide_ray.cli import main as coincide_ray

LATEST = "latest.json"


def previous_run(root: str, output: str) -> str | None:
    """The run to reuse: the latest one, or the one before it when tonight's run is the
    latest already (the same night run again)."""
    pointer = io.join(root, LATEST)
    if not io.exists(pointer):
        return None
    latest = io.read_json(pointer)
    return latest.get("previous") if latest["run"] == output else latest["run"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--root", required=True, metavar="URI", help="folder or s3:// prefix holding runs/ and latest.json")
    parser.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                        help="name of tonight's run (default: today's UTC date)")
    args, passed = parser.parse_known_args(argv)
    output = io.join(args.root, "runs", args.date)
    previous = previous_run(args.root, output)
    code = coincide_ray(["run", *passed, "--output", output, *(["--previous", previous] if previous else [])])
    if code == 0:
        io.write_json({"run": output, "previous": previous, "date": args.date}, io.join(args.root, LATEST))
        print(f"[coincide-ray] {io.join(args.root, LATEST)} -> {output}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
