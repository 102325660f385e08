# Training: the MLflow backend and a comparison (parent) run are made once, then one job per
# {cohort} × {head} × {seed} trains a model on the tile stores of that cohort and logs a child run.
# A cohort is a kind (slide | image), prefixed by the demo dataset in a sweep (w01-slide).


rule mlflow_setup:
    output:
        COMPARISON,
    params:
        experiment=config["mlflow"]["experiment"],
        options=mlflow_options,
        results=results_folder,
        config=logged_config(),
    log:
        f"{LOGS}/mlflow_setup.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless mlflow-setup --experiment {params.experiment:q} --results {params.results:q} {params.options}"
        " --config {params.config:q} --out {output:q} > {log:q} 2>&1"


rule train:
    input:
        sheet=cohort_sheet,
        stores=cohort_stores,
        # a new comparison run (e.g. the experiment was renamed) does not retrain finished models
        comparison=ancient(COMPARISON),
    output:
        weights=f"{MODELS}/{{cohort}}/{{head}}/seed{{seed}}/weights.safetensors",
        model=f"{MODELS}/{{cohort}}/{{head}}/seed{{seed}}/model.json",
        metrics=f"{MODELS}/{{cohort}}/{{head}}/seed{{seed}}/metrics.json",
        run_id=f"{MODELS}/{{cohort}}/{{head}}/seed{{seed}}/run_id.txt",
    params:
        out=run_folder,
        tiles=TILES,
        classes=config["classes"],
        settings=train_settings,
        config=logged_config,
        kind=cohort_kind,
    threads: config["train"]["threads"]
    resources:
        gpu=TRAIN_GPU_UNITS,
        mem_mb=16000,
    log:
        f"{LOGS}/train/{{cohort}}/{{head}}/seed{{seed}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless train --samples {input.sheet:q} --tiles {params.tiles:q} --out {params.out:q}"
        " --kind {params.kind} --head {wildcards.head} --seed {wildcards.seed} --classes {params.classes:q}"
        " --threads {threads} --comparison {input.comparison:q} --config {params.config:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
