"""The container image every component runs in (one image for all stages; see the Dockerfile)."""
import os

# Build-time default; `lgff pipeline compile/submit` also sets each task's image from `pipeline.image`.
LGFF_IMAGE = os.environ.get("LGFF_IMAGE", "ghcr.io/lgff/lgff:0.1.0")
