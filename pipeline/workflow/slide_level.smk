# The slide level (slide_level.enabled): each slide's tiles embedded by an encoder, then every head of
# slide_level.heads trained over the slides' tile grids from slide labels alone, and its maps on the slides.
#
#   embed:          one job per slide cohort × encoder, the encoder loaded once:
#                   results/embeddings/{cohort}/{encoder}/{sample}.zarr, where the
#                   encoder is a tile-level model of the same cohort (slide_level.encoder: a head of train.heads;
#                   the encoder tag `{head}-seed{seed}`, one per slide-level seed, so that seed's split is the
#                   encoder's split: no test slide was seen when training the encoder), of another sweep dataset
#                   (slide_level.encoder_dataset, e.g. an annotated cohort: tag `{dataset}.{head}-seed{seed}`), or a
#                   timm backbone (slide_level.encoder: timm:NAME, random init or slide_level.weights; tag `timm-NAME`)
#   train_slides:   one job per slide cohort × head × seed: results/slide_models/{cohort}/{head}/seed{seed}/,
#                   an MLflow child run of the comparison tagged gapless.level = slide
#   heatmap_slides: one job per slide-level model: its maps over the cohort's slides
#                   (results/heatmaps/slide_level/{head}/seed{seed}/), scored against the annotations (the sheet's,
#                   or slide_level.annotations: kept for scoring only), manifest in
#                   results/heatmaps/manifests/slide_level/{head}/seed{seed}/{cohort}.json; the viewer seed's maps
#                   are a second set of layers on the slides' pages ("… · slide level")


wildcard_constraints:
    encoder=r"(?:[A-Za-z0-9]+\.)?[a-z0-9_]+-seed\d+|timm-[A-Za-z0-9_.]+",


rule embed:
    input:
        sheet=cohort_sheet,
        stores=cohort_stores,
        weights=encoder_weights,
    output:
        directory(f"{EMBEDDINGS}/{{cohort}}/{{encoder}}"),
    params:
        tiles=TILES,
        options=embed_options,
        device=config["train"]["device"],
    threads: config["slide_level"]["threads"]
    resources:
        gpu=GPU_UNITS,
        mem_mb=8000,
    log:
        f"{LOGS}/embed/{{cohort}}/{{encoder}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless embed --samples {input.sheet:q} --tiles {params.tiles:q} --kind slide --out {output:q}"
        " {params.options} --device {params.device} --threads {threads} > {log:q} 2>&1"


rule train_slides:
    input:
        sheet=cohort_sheet,
        embeddings=embeddings_folder,
        comparison=ancient(COMPARISON),
    output:
        weights=f"{SLIDE_MODELS}/{{cohort}}/{{head}}/seed{{seed}}/weights.safetensors",
        metrics=f"{SLIDE_MODELS}/{{cohort}}/{{head}}/seed{{seed}}/metrics.json",
        run_id=f"{SLIDE_MODELS}/{{cohort}}/{{head}}/seed{{seed}}/run_id.txt",
    params:
        out=run_folder,
        classes=config["classes"],
        settings=slide_train_settings,
        config=logged_config,
        device=config["train"]["device"],
    threads: config["slide_level"]["threads"]
    resources:
        gpu=GPU_UNITS,
        mem_mb=8000,
    log:
        f"{LOGS}/train_slides/{{cohort}}/{{head}}/seed{{seed}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless train-slides --samples {input.sheet:q} --embeddings {input.embeddings:q} --out {params.out:q}"
        " --head {wildcards.head} --seed {wildcards.seed} --split-seed {wildcards.seed} --classes {params.classes:q}"
        " --device {params.device} --threads {threads} --comparison {input.comparison:q} --config {params.config:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule heatmap_slides:
    input:
        weights=f"{SLIDE_MODELS}/{{cohort}}/{{head}}/seed{{seed}}/weights.safetensors",
        embeddings=embeddings_folder,
        sheet=cohort_sheet,
        comparison=ancient(COMPARISON),
        written=written_list,
    output:
        f"{HEATMAPS}/manifests/slide_level/{{head}}/seed{{seed}}/{{cohort}}.json",
    params:
        run=heatmap_run,
        out=slide_heatmap_folder,
        options=slide_heatmap_options,
        written=written_options,
        device=config["train"]["device"],
    threads: config["slide_level"]["threads"]
    resources:
        gpu=GPU_UNITS,
        mem_mb=8000,
    log:
        f"{LOGS}/heatmap_slides/{{cohort}}/{{head}}/seed{{seed}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless heatmap-slides --model {params.run:q} --samples {input.sheet:q} --embeddings {input.embeddings:q}"
        " --out {params.out:q} --manifest {output:q} --device {params.device} --threads {threads}"
        " --comparison {input.comparison:q} {params.options} {params.written} > {log:q} 2>&1"
