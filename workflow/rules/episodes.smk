"""Stage episodes (paper 'Task constructing'): pseudo regions and their support candidates."""


rule episodes:
    input:
        labels=lambda w: label_shards(w.src, w.embedder, w.clusters),
        embeddings=lambda w: embedding_shards(w.src, w.embedder),
    output:
        regions="results/{src}/{embedder}/clusters-{clusters}/regions.parquet",
        candidates="results/{src}/{embedder}/clusters-{clusters}/candidates.parquet",
        features="results/{src}/{embedder}/clusters-{clusters}/region_features.npy",
    params:
        cfg=stage_config("episodes"),
        out=lambda w, output: os.path.dirname(output.regions),
    threads: 2
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/clusters-{clusters}/episodes.log",
    benchmark:
        "results/benchmarks/{src}/{embedder}/clusters-{clusters}/episodes.tsv"
    shell:
        "umtfss episodes --config {params.cfg:q} --labels {input.labels} "
        "--embeddings {input.embeddings} --out-dir {params.out} > {log} 2>&1"
