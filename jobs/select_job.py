"""`ray job submit` entrypoint: every stage (embed, cluster, select) with the CLI's flags.

    ray job submit --working-dir . -- python jobs/select_job.py --input s3://bucket/llava.json \\
        --image-root s3://bucket/images/ --model s3://bucket/models/tinyllava \\
        --output s3://bucket/runs/665k --fraction 0.2 --clusters 10000 --config job.yaml

Under `ray job submit` the job joins the cluster through RAY_ADDRESS; run directly, it
starts a local Ray. Same flags as `coincide-ray run`.
"""

import sys

from coincide_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
