# Heatmaps: one job per trained model (cohort × head × seed) maps every sample of its cohort, the model
# loaded once; a Deep Zoom pyramid and a static viewer page for each paged sample (heatmaps.pages); an
# index page listing every mapped sample (the viewer seed's manifests) and linking the paged ones.
# With heatmaps.pages: test or a max_pages, only the viewer seed's models write files, and only for the
# paged samples (and the report's figure sample): every sample is still mapped and scored.
# The heatmap job's settings (heatmaps.normalisation, batch_size, gradcam) reach `gapless heatmap` as one
# --settings JSON (HEATMAP_SETTINGS); with heatmaps.gradcam each head's Grad-CAM map is written beside its
# own map (same folder, {sample}.gradcam.png and .gradcam.overlay.png, named in {sample}.json), scored as
# gradcam_* in the manifest and the model's run, and shown as a layer on the sample pages.


ruleorder: heatmap_index > sample_page  # results/heatmaps/index.html is the index, never a sample's page


rule heatmap_written:
    # which samples' files a model's heatmap job writes, when not all (common.smk: written_samples)
    output:
        f"{HEATMAPS}/manifests/written/seed{{seed}}/{{cohort}}.txt",
    log:
        f"{LOGS}/heatmap_written/seed{{seed}}/{{cohort}}.log",
    localrule: True
    run:
        write_written_list(wildcards, output[0], log[0])


rule heatmap:
    input:
        weights=f"{MODELS}/{{cohort}}/{{head}}/seed{{seed}}/weights.safetensors",
        tiles=cohort_stores,
        sheet=cohort_sheet,
        comparison=ancient(COMPARISON),
        written=written_list,
    output:
        f"{HEATMAPS}/manifests/{{head}}/seed{{seed}}/{{cohort}}.json",
    params:
        run=heatmap_run,
        out=heatmap_folder,
        tiles=TILES,
        kind=cohort_kind,
        settings=HEATMAP_SETTINGS,
        options=heatmap_options,
        written=written_options,
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
        " --comparison {input.comparison:q} {params.options} {params.written} > {log:q} 2>&1"


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
    wildcard_constraints:
        sample=rf"(?!index\.(?:html|json)$){SAMPLE_ID_PATTERN}",  # index.html is the index's (no sample is called index)
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
