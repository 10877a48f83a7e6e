"""`python -m infra.clouds.local engine|image`: the Makefile's set-up steps for the local cloud."""

import sys

from infra.clouds.local import engine, image
from infra.errors import TrainrigError

STEPS = {
    "engine": lambda: engine.ensure() or "Docker engine is running",
    # Both images: nodes, and the offline base that job images build on.
    "image": lambda: f"{image.ensure_image()} {image.ensure_job_base()}",
}

if __name__ == "__main__":
    step = sys.argv[1] if len(sys.argv) > 1 else ""
    if step not in STEPS:
        sys.exit(f"usage: python -m infra.clouds.local {'|'.join(STEPS)}")
    try:
        print(STEPS[step]())
    except TrainrigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
