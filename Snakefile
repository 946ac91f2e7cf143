# SACPO: Stepwise Alignment for Constrained Policy Optimization (Wachi et al., NeurIPS 2024)
# as a Snakemake workflow. `snakemake --cores all` runs the offline demo.
from snakemake.utils import min_version

min_version("9.0")


# A --configfile on the command line must define the whole experiment: Snakemake
# would otherwise merge it key by key over the demo config and leak demo models.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        PLAN.final_outputs(TABLES, FIGURE_NAMES),
    default_target: True
