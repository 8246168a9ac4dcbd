#!/bin/sh
# Snakemake runs this inside a new conda environment of the workflow: it installs umtfss from this
# checkout, editable, so that code changes reach the jobs. workflow/rules/common.smk exports
# UMTFSS_SOURCE (the checkout's folder); the environment file cannot name it by a relative path.
set -eu
: "${UMTFSS_SOURCE:?is not set; run the workflow through workflow/Snakefile, whose common.smk sets it}"
python -m pip install --no-input -e "${UMTFSS_SOURCE}[coco]"
