"""Figures for `snakemake --report`: the features embed stored, the pseudo masks the clustering found,
the loss curves of training."""


rule feature_pca:
    input:
        # the first shard's first images, as for the pseudo masks
        embeddings=lambda w: embedding_shards(w.src, w.embedder)[0],
        images="results/{src}/prepare/images.parquet",
    output:
        report(
            "results/{src}/{embedder}/embeddings/features.png",
            caption="../report/features.rst",
            category="Pseudo classes",
        ),
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/feature_pca.log",
    shell:
        "umtfss inspect {input.embeddings} --images {input.images} --overlay {output} --n 16 > {log} 2>&1"


rule pseudo_masks:
    input:
        # the first shard's first images are enough to see what the clusters are
        labels=lambda w: label_shards(w.src, w.embedder, w.clusters)[0],
        images="results/{src}/prepare/images.parquet",
    output:
        report(
            "results/{src}/{embedder}/clusters-{clusters}/pseudo_masks.png",
            caption="../report/pseudo_masks.rst",
            category="Pseudo classes",
        ),
    params:
        # a benchmark's images have labels: each is shown beside its pseudo masks (a look, never training)
        truth=lambda w: "--ground-truth" if w.src in LABELLED else "",
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/clusters-{clusters}/pseudo_masks.log",
    shell:
        "umtfss inspect {input.labels} --images {input.images} --overlay {output} --n 16 {params.truth} > {log} 2>&1"


rule training_curves:
    input:
        lambda w: [path for _, path in trained_checkpoints(w)],
    output:
        report("results/training_{dataset}.png", caption="../report/training.rst", category="Training"),
    params:
        # log.csv is written beside each checkpoint.pt, in the same job; not an output of the train rules:
        # Snakemake deletes a job's outputs before it runs and after it fails, and a resumed training keeps
        # the rows of the epochs it resumes from (like last.pt, it is the run's own state)
        logs=lambda w: " ".join(f"--log '{m}={os.path.dirname(p)}/log.csv'" for m, p in trained_checkpoints(w)),
    conda:
        CONDA_ENV
    log:
        "logs/training_{dataset}.log",
    shell:
        "umtfss plot-training {params.logs} --out {output} > {log} 2>&1"
