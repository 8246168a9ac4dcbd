"""Data sets: the generated demo, converters for SBD / COCO annotations, and the prepare tables."""


if DEMO:

    rule demo:
        output:
            f"{config['datasets']['pascal']['root']}/demo.json",
        params:
            cfg=stage_config("demo"),
            root=lambda w, output: os.path.dirname(output[0]),
        conda:
            CONDA_ENV
        log:
            "logs/demo.log",
        shell:
            "umtfss demo --config {params.cfg:q} --out {params.root:q} > {log} 2>&1"


if config["datasets"]["pascal"]["sbd_root"] and not DEMO:

    rule convert_sbd:
        output:  # (and the merged masks under label_dir)
            f"{config['datasets']['pascal']['root']}/{config['datasets']['pascal']['train_list']}",
            f"{config['datasets']['pascal']['root']}/{config['datasets']['pascal']['val_list']}",
        params:
            cfg=stage_config("datasets", dataset="pascal"),
        conda:
            CONDA_ENV
        log:
            "logs/convert_sbd.log",
        benchmark:
            "results/benchmarks/convert_sbd.tsv"
        shell:
            "umtfss convert-sbd --config {params.cfg:q} > {log} 2>&1"


if config["datasets"]["coco"]["instances_dir"]:

    rule convert_coco:
        output:
            touch(f"{config['datasets']['coco']['root']}/.umtfss-converted"),
        params:
            cfg=stage_config("datasets", converter=True, dataset="coco"),
        conda:
            CONDA_ENV
        log:
            "logs/convert_coco.log",
        benchmark:
            "results/benchmarks/convert_coco.tsv"
        shell:
            "umtfss convert-coco --config {params.cfg:q} > {log} 2>&1"


rule prepare:
    input:
        lambda w: dataset_inputs(w.dataset),
    output:
        **prepared("{dataset}"),
    params:
        cfg=lambda w: stage_config("datasets", dataset=w.dataset),
        out=lambda w, output: os.path.dirname(output.images),
    threads: 2
    conda:
        CONDA_ENV
    log:
        "logs/{dataset}/prepare.log",
    benchmark:  # COCO's prepare reads every class mask
        "results/benchmarks/{dataset}/prepare.tsv"
    shell:
        "umtfss prepare --config {params.cfg:q} --dataset {wildcards.dataset} --out {params.out} "
        "--workers {threads} > {log} 2>&1"


if config["datasets"]["custom"]["root"]:

    ruleorder: prepare_custom > prepare

    rule prepare_custom:
        # your own labelled images (datasets.custom); the generic prepare would not see their files change
        input:
            dataset_inputs(CUSTOM),
        output:
            **prepared(CUSTOM),
        params:
            cfg=stage_config("datasets", dataset=CUSTOM),
            out=lambda w, output: os.path.dirname(output.images),
            # the image and mask folders' file lists (names, sizes, times): adding, removing or rewriting
            # an image or a mask reruns prepare
            files=lambda w: custom_files(),
        threads: 2
        conda:
            CONDA_ENV
        log:
            f"logs/{CUSTOM}/prepare.log",
        benchmark:
            f"results/benchmarks/{CUSTOM}/prepare.tsv"
        shell:
            "umtfss prepare --config {params.cfg:q} --dataset custom --out {params.out} "
            "--workers {threads} > {log} 2>&1"


if SOURCE == "folder":

    rule prepare_folder:
        output:
            f"results/{SRC}/prepare/images.parquet",
            f"results/{SRC}/prepare/classes.parquet",
            f"results/{SRC}/prepare/image_classes.parquet",
        params:
            cfg=stage_config(only={"unlabeled": ("folder", "name")}),
            out=lambda w, output: os.path.dirname(output[0]),
            # the folder's image list (names, sizes, times): adding, removing or rewriting an image reruns prepare
            images=folder_images(),
        conda:
            CONDA_ENV
        log:
            f"logs/{SRC}/prepare.log",
        benchmark:
            f"results/benchmarks/{SRC}/prepare.tsv"
        shell:
            "umtfss prepare --config {params.cfg:q} --dataset folder --out {params.out} > {log} 2>&1"
