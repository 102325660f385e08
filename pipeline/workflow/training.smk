# Training: the MLflow backend and a comparison (parent) run are made once, then one job per
# {kind} × {head} × {seed} trains a model on the tile stores of that kind and logs a child run.


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
        sheet=SHEET,
        stores=cohort_stores,
        # a new comparison run (e.g. the experiment was renamed) does not retrain finished models
        comparison=ancient(COMPARISON),
    output:
        weights=f"{MODELS}/{{kind}}/{{head}}/seed{{seed}}/weights.safetensors",
        model=f"{MODELS}/{{kind}}/{{head}}/seed{{seed}}/model.json",
        metrics=f"{MODELS}/{{kind}}/{{head}}/seed{{seed}}/metrics.json",
        run_id=f"{MODELS}/{{kind}}/{{head}}/seed{{seed}}/run_id.txt",
    params:
        out=run_folder,
        tiles=TILES,
        classes=config["classes"],
        options=train_options,
        config=logged_config(),
    threads: config["train"]["threads"]
    resources:
        gpu=1,
        mem_mb=16000,
    log:
        f"{LOGS}/train/{{kind}}/{{head}}/seed{{seed}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless train --samples {input.sheet:q} --tiles {params.tiles:q} --out {params.out:q}"
        " --kind {wildcards.kind} --head {wildcards.head} --seed {wildcards.seed} --classes {params.classes:q}"
        " --threads {threads} --comparison {input.comparison:q} --config {params.config:q} {params.options}"
        " > {log:q} 2>&1"
