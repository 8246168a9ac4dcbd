"""Stages fit and assign (paper Eq. 3-4): k-means on a pixel subset, then every pixel's cluster."""


rule fit:
    input:
        lambda w: embedding_shards(w.src, w.embedder),
    output:
        centroids="results/{src}/{embedder}/clusters-{clusters}/centroids.npy",
        meta="results/{src}/{embedder}/clusters-{clusters}/fit.json",
    params:
        cfg=lambda w: fit_config(w.clusters),
    threads: 2
    resources:
        gpu=gpus("clustering"),
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/clusters-{clusters}/fit.log",
    benchmark:
        "results/benchmarks/{src}/{embedder}/clusters-{clusters}/fit.tsv"
    shell:
        "umtfss fit --config {params.cfg:q} --embeddings {input} "
        "--out-centroids {output.centroids} --out-meta {output.meta} > {log} 2>&1"


rule assign:
    input:
        embeddings="results/{src}/{embedder}/embeddings/shard-{shard}-of-{nshards}.zarr",
        centroids="results/{src}/{embedder}/clusters-{clusters}/centroids.npy",
        # superpixels are computed on the images themselves
        images=lambda w: f"results/{w.src}/prepare/images.parquet" if REFINE else [],
    output:
        directory("results/{src}/{embedder}/clusters-{clusters}/labels/shard-{shard}-of-{nshards}.zarr"),
    params:
        cfg=assign_config(),
        images=lambda w, input: f"--images {input.images}" if REFINE else "",
    threads: 2
    resources:
        gpu=gpus("clustering"),
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/clusters-{clusters}/assign-{shard}-of-{nshards}.log",
    benchmark:
        "results/benchmarks/{src}/{embedder}/clusters-{clusters}/assign-{shard}-of-{nshards}.tsv"
    shell:
        "umtfss assign --config {params.cfg:q} --embeddings {input.embeddings} "
        "--centroids {input.centroids} {params.images} --out {output} > {log} 2>&1"


rule quality:
    input:
        labels=lambda w: label_shards(w.src, w.embedder, w.clusters),
        images="results/{src}/prepare/images.parquet",
        classes="results/{src}/prepare/classes.parquet",
    output:
        report(
            "results/{src}/{embedder}/clusters-{clusters}/cluster_quality.csv",
            caption="../report/cluster_quality.rst",
            category="Pseudo classes",
        ),
    params:
        cfg=stage_config(),  # quality reads no key
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/clusters-{clusters}/quality.log",
    shell:
        "umtfss quality --config {params.cfg:q} --labels {input.labels} --images {input.images} "
        "--classes {input.classes} --out {output} > {log} 2>&1"
