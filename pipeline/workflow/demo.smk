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
                slides=settings["slides"],
                images=settings["images"],
                slide_width=settings["slide_width"],
                slide_height=settings["slide_height"],
                slide_mpp=settings["slide_mpp"],
                image_size=settings["image_size"],
                image_mpp=settings["image_mpp"],
                cell_density=settings["cell_density"],
                witness_fraction=settings["witness_fraction"],
                lesions=settings["lesions"],
                seed=settings["seed"],
                prefix=shlex.join(["--id-prefix", dataset_prefix(dataset)]) if dataset else "",
            log:
                f"{LOGS}/{demo_rule}.log",
            conda:
                "../../envs/gapless.yaml"
            shell:
                "gapless demo --out {params.out:q} --slides {params.slides} --images {params.images}"
                " --slide-width {params.slide_width} --slide-height {params.slide_height}"
                " --slide-mpp {params.slide_mpp} --image-size {params.image_size} --image-mpp {params.image_mpp}"
                " --cell-density {params.cell_density} --witness-fraction {params.witness_fraction}"
                " --lesions {params.lesions} --seed {params.seed} {params.prefix} > {log:q} 2>&1"
