# The synthetic demo: slides and cell images with known witnesses, and the sample sheet describing them.
# Only defined when no sample sheet is given, so a user's run can never overwrite it by accident.

if DEMO_MODE:

    rule demo:
        output:
            files=demo_files(),
            sheet=DEMO_SHEET,
        params:
            out=demo_folder,
            slides=config["demo"]["slides"],
            images=config["demo"]["images"],
            slide_width=config["demo"]["slide_width"],
            slide_height=config["demo"]["slide_height"],
            slide_mpp=config["demo"]["slide_mpp"],
            image_size=config["demo"]["image_size"],
            image_mpp=config["demo"]["image_mpp"],
            cell_density=config["demo"]["cell_density"],
            witness_fraction=config["demo"]["witness_fraction"],
            lesions=config["demo"]["lesions"],
            seed=config["demo"]["seed"],
        log:
            f"{LOGS}/demo.log",
        conda:
            "../../envs/gapless.yaml"
        shell:
            "gapless demo --out {params.out:q} --slides {params.slides} --images {params.images}"
            " --slide-width {params.slide_width} --slide-height {params.slide_height}"
            " --slide-mpp {params.slide_mpp} --image-size {params.image_size} --image-mpp {params.image_mpp}"
            " --cell-density {params.cell_density} --witness-fraction {params.witness_fraction}"
            " --lesions {params.lesions} --seed {params.seed} > {log:q} 2>&1"
