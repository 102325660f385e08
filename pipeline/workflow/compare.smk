# The comparison: every run of this comparison read back from MLflow (not from loose files),
# tables with intervals over seeds, each head against the baseline head (gap), plots; logged to the comparison run.
# The settings are train.kind and the demo keys the sweep varies; the plot's x axis is report.x or the numeric
# swept key with the most distinct values (common.smk: report_settings), and names the plot: metric_vs_<x>.png.


rule compare:
    input:
        comparison=ancient(COMPARISON),
        metrics=trained_models(),
        heatmaps=heatmap_manifests(),  # every seed's scores are in MLflow before the report reads it
        slide_metrics=slide_models(),  # the slide level (slide_level.enabled), its own block
        slide_heatmaps=slide_manifests(),
    output:
        summary=report(f"{REPORT}/summary.tsv", caption="report/summary.rst", category="Comparison"),
        paired=report(f"{REPORT}/paired.tsv", caption="report/paired.rst", category="Comparison"),
        runs=f"{REPORT}/runs.tsv",
        markdown=report(f"{REPORT}/report.md", caption="report/report.rst", category="Comparison"),
        plot=report(report_plot(), caption="report/metrics.rst", category="Comparison"),  # metric_vs_<x>.png
        heatmaps=report(f"{REPORT}/heatmaps_side_by_side.png", caption="report/heatmaps.rst", category="Heatmaps"),
    params:
        out=report_folder,
        heatmaps=report_heatmap_options,
        settings=report_setting_options,
    log:
        f"{LOGS}/compare.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless report --comparison {input.comparison:q} --out {params.out:q} {params.settings} {params.heatmaps} > {log:q} 2>&1"
