# Tiling: a zarr store of tiles per slide (one job each), cell images many per job into a batch store
# (tiling.batch per job), then one QC table over all samples.


rule tile:
    input:
        source=tile_source,
        annotations=tile_annotations,
    output:
        directory(f"{TILES}/{{sample}}.zarr"),
    params:
        kind=sample_kind,
        settings=tile_settings,
        options=tile_options,
    threads: 4
    resources:
        mem_mb=8000,
    log:
        f"{LOGS}/tile/{{sample}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless tile {input.source:q} --out {output:q} --kind {params.kind} --settings {params.settings:q}"
        " --workers {threads} {params.options} > {log:q} 2>&1"


rule tile_batch:
    input:
        sources=batch_sources,
        annotations=batch_annotations,
        sheet=batch_sheet,
    output:
        store=directory(f"{TILES}/batches/{{batch}}.zarr"),
        manifest=f"{TILES}/batches/{{batch}}.json",
    params:
        ids=batch_ids,
        settings=image_settings,
    threads: 1
    resources:
        mem_mb=4000,
    log:
        f"{LOGS}/tile_batch/{{batch}}.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        "gapless tile-batch --samples {input.sheet:q} --ids {params.ids} --out {output.store:q}"
        " --manifest {output.manifest:q} --settings {params.settings:q} > {log:q} 2>&1"


rule tiles_qc:
    input:
        tile_stores,
    output:
        f"{TILES}/qc.tsv",
    log:
        f"{LOGS}/tiles_qc.log",
    conda:
        "../../envs/gapless.yaml"
    shell:
        # through tee: the QC flags (empty stores, annotations off the tissue) show on the console too
        "gapless qc {input:q} --out {output:q} 2>&1 | tee {log:q}"
