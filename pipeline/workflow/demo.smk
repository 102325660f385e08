# The synthetic demo: slides and cell images with known witnesses, and the sample sheet describing them.
# Only defined when no sample sheet is given, so a user's run can never overwrite it by accident.
# One rule per dataset: `demo` for the default, `demo_{name}` for each entry of a `sweep`.

if DEMO_MODE:
    for dataset, settings in DATASETS.items():
        demo_rule = f"demo_{dataset}" if dataset else "demo"

        rule:
            name:
                demo_rule
            output:
                files=demo_files(dataset),
                sheet=dataset_sheet(dataset),
            params:
                out=demo_folder,
                settings=demo_settings(dataset),
                prefix=shlex.join(["--id-prefix", dataset_prefix(dataset)]) if dataset else "",
            log:
                f"{LOGS}/{demo_rule}.log",
            conda:
                "../../envs/gapless.yaml"
            shell:
                "gapless demo --out {params.out:q} --settings {params.settings:q} {params.prefix} > {log:q} 2>&1"
