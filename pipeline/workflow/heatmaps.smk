# Heatmaps: one job per trained model (cohort × head × seed) maps every sample of its cohort, the model
# loaded once; a Deep Zoom pyramid and a static viewer page for each paged sample (heatmaps.pages); an
# index page listing every mapped sample (the viewer seed's manifests) and linking the paged ones.


ruleorder: heatmap_index > sample_page  # results/heatmaps/index.html is the index, never a sample's page


rule heatmap:
    input:
        weights=f"{MODELS}/{{cohort}}/{{head}}/seed{{seed}}/weights.safetensors",
        tiles=cohort_stores,
        sheet=cohort_sheet,
        comparison=ancient(COMPARISON),
    output:
        f"{HEATMAPS}/manifests/{{head}}/seed{{seed}}/{{cohort}}.json",
    params:
        run=heatmap_run,
        out=heatmap_folder,
        tiles=TILES,
        kind=cohort_kind,
        settings=HEATMAP_SETTINGS,
        options=heatmap_options,
        device=config["train"]["device"],
    threads: config["heatmaps"]["threads"]
    resources:
        gpu=GPU_UNITS,
        mem_mb=8000,
    log:
        f"{LOGS}/heatmap/{{cohort}}/{{head}}/seed{{seed}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless heatmap --samples {input.sheet:q} --tiles {params.tiles:q} --kind {params.kind}"
        " --model {params.run:q} --out {params.out:q} --manifest {output:q}"
        " --settings {params.settings:q} --device {params.device} --threads {threads}"
        " --comparison {input.comparison:q} {params.options} > {log:q} 2>&1"


rule slide_pyramid:
    input:
        tile_source,
    output:
        directory(f"{HEATMAPS}/slides/{{sample}}"),
    params:
        options=pyramid_options,
    threads: 2
    log:
        f"{LOGS}/slide_pyramid/{{sample}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless pyramid {input:q} --out {output:q} {params.options} --workers {threads} > {log:q} 2>&1"


rule sample_page:
    input:
        pyramid=f"{HEATMAPS}/slides/{{sample}}",
        heatmaps=page_manifests,
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


rule qupath:
    input:
        page_manifests,
    output:
        f"{HEATMAPS}/qupath/{{sample}}.geojson",
    params:
        heatmaps=sample_heatmaps,
    log:
        f"{LOGS}/qupath/{{sample}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless qupath {params.heatmaps} --out {output:q} > {log:q} 2>&1"


rule heatmap_index:
    input:
        summaries=page_summaries,
        manifests=index_manifests,
        sheets=index_sheets,
    output:
        f"{HEATMAPS}/index.html",
    params:
        options=index_options,
    log:
        f"{LOGS}/heatmap_index.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless index {params.options} --out {output:q} > {log:q} 2>&1"
