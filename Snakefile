# The workflow's entry point is workflow/Snakefile (the Snakemake workflow catalog and
# snakedeploy use it); this file lets `snakemake --cores all` run the offline demo in a
# clone, with profiles/default as its workflow profile.
include: "workflow/Snakefile"

# an included file's rule never becomes the default target by itself (Snakemake 9)
workflow.default_target = "all"
