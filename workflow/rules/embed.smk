"""Stage embed: per-pixel self-supervised features, one Zarr store per shard (one writer each)."""


rule embed:
    input:
        images="results/{src}/prepare/images.parquet",
    output:
        directory("results/{src}/{embedder}/embeddings/shard-{shard}-of-{nshards}.zarr"),
    params:
        cfg=stage_config("embedding"),
    threads: 2
    resources:
        gpu=gpus("embedding"),
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/embed-{shard}-of-{nshards}.log",
    benchmark:
        "results/benchmarks/{src}/{embedder}/embed-{shard}-of-{nshards}.tsv"
    shell:
        "umtfss embed --config {params.cfg:q} --images {input.images} "
        "--shard {wildcards.shard} --num-shards {wildcards.nshards} --out {output} > {log} 2>&1"
