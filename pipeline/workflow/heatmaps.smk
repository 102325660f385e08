# Heatmaps: each trained head's spatial map stitched onto every sample of its kind (one job per
# {head} × {sample}, all seeds inside it so every seed is scored), then a Deep Zoom pyramid and a
# static viewer page per sample, and an index page linking them all.


rule heatmap:
    input:
        store=f"{TILES}/{{sample}}.zarr",
        weights=heatmap_weights,
        comparison=ancient(COMPARISON),
    output:
        expand(f"{HEATMAPS}/{{{{head}}}}/seed{{seed}}/{{{{sample}}}}.json", seed=config["train"]["seeds"]),
    params:
        models=heatmap_model_options,
        settings=HEATMAP_SETTINGS,
        options=heatmap_options,
        device=config["train"]["device"],
    threads: config["heatmaps"]["threads"]
    resources:
        gpu=GPU_UNITS,
        mem_mb=8000,
    log:
        f"{LOGS}/heatmap/{{head}}/{{sample}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless heatmap {input.store:q} {params.models} --sample={wildcards.sample}"
        " --settings {params.settings:q} --device {params.device} --threads {threads}"
        " --comparison {input.comparison:q} {params.options} > {log:q} 2>&1"


rule slide_pyramid:
    input:
        tile_source,
    output:
        directory(f"{HEATMAPS}/slides/{{sample}}"),
    params:
        kind=sample_kind,
    threads: 2
    log:
        f"{LOGS}/slide_pyramid/{{sample}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless pyramid {input:q} --out {output:q} --kind {params.kind} --workers {threads} > {log:q} 2>&1"


rule sample_page:
    input:
        pyramid=f"{HEATMAPS}/slides/{{sample}}",
        heatmaps=page_heatmaps,
    output:
        page=f"{HEATMAPS}/{{sample}}.html",
        summary=f"{HEATMAPS}/pages/{{sample}}.json",
    params:
        options=page_options,
    log:
        f"{LOGS}/sample_page/{{sample}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless page {wildcards.sample} --pyramid {input.pyramid:q} {params.options}"
        " --out {output.page:q} --summary {output.summary:q} > {log:q} 2>&1"


rule heatmap_index:
    input:
        page_summaries,
    output:
        f"{HEATMAPS}/index.html",
    log:
        f"{LOGS}/heatmap_index.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless index {input:q} --out {output:q} > {log:q} 2>&1"
