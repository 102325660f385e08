# Tiling: one zarr store of tiles per sample on a µm/px grid, then one QC table over all stores.


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
