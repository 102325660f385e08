# gapless: tile slides and cell images, compare GAP with attention heads, map where they look.
# This file is the table of contents; the rules are in pipeline/workflow/, one file per stage.

from snakemake.utils import min_version, validate

from pipeline.config import coerce_config

min_version("9.0")


configfile: "config/config.yaml"


# nested --config values arrive as strings (train='{epochs: 2}' gives '2'): read them with the schema's types
coerce_config(config, f"{workflow.basedir}/config/schema.yaml")
validate(config, "config/schema.yaml")


include: "pipeline/workflow/common.smk"
include: "pipeline/workflow/demo.smk"
include: "pipeline/workflow/tiling.smk"
include: "pipeline/workflow/training.smk"
include: "pipeline/workflow/heatmaps.smk"
include: "pipeline/workflow/slide_level.smk"
include: "pipeline/workflow/compare.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
