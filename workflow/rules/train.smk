"""Stage train: unsupervised meta-training on pseudo episodes, supervised training, fine-tuning."""


rule train_unsup:
    input:
        regions="results/{src}/{embedder}/clusters-{clusters}/regions.parquet",
        candidates="results/{src}/{embedder}/clusters-{clusters}/candidates.parquet",
        features="results/{src}/{embedder}/clusters-{clusters}/region_features.npy",
        labels=lambda w: label_shards(w.src, w.embedder, w.clusters),
        images="results/{src}/prepare/images.parquet",
    output:
        "results/{src}/{embedder}/clusters-{clusters}/models/{model}/unsup/checkpoint.pt",
    params:
        cfg=meta_training_config("model"),
        out=lambda w, output: os.path.dirname(output[0]),
        episodes=lambda w, input: os.path.dirname(input.regions),
    threads: TORCH_JOB_THREADS
    resources:
        gpu=gpus("training"),
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/clusters-{clusters}/{model}/train-unsup.log",
    benchmark:
        "results/benchmarks/{src}/{embedder}/clusters-{clusters}/{model}/train-unsup.tsv"
    shell:
        "umtfss train --config {params.cfg:q} --method unsup --out-dir {params.out} "
        "--episodes {params.episodes} --labels {input.labels} --images {input.images} > {log} 2>&1"


rule train_unsup_fold:
    input:
        regions="results/{src}/{embedder}/clusters-{clusters}/regions.parquet",
        candidates="results/{src}/{embedder}/clusters-{clusters}/candidates.parquet",
        features="results/{src}/{embedder}/clusters-{clusters}/region_features.npy",
        labels=lambda w: label_shards(w.src, w.embedder, w.clusters),
        images="results/{src}/prepare/images.parquet",
        tables=lambda w: list(prepared(w.src).values()),
    output:
        "results/{src}/{embedder}/clusters-{clusters}/models/{model}/unsup-fold{fold}/checkpoint.pt",
    params:
        cfg=meta_training_config("model", only={"unlabeled": ("fold_images",)}),
        out=lambda w, output: os.path.dirname(output[0]),
        episodes=lambda w, input: os.path.dirname(input.regions),
        tables=lambda w, input: os.path.dirname(input.images),
    threads: TORCH_JOB_THREADS
    resources:
        gpu=gpus("training"),
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/clusters-{clusters}/{model}/train-unsup-fold{fold}.log",
    benchmark:
        "results/benchmarks/{src}/{embedder}/clusters-{clusters}/{model}/train-unsup-fold{fold}.tsv"
    shell:
        "umtfss train --config {params.cfg:q} --method unsup --out-dir {params.out} "
        "--episodes {params.episodes} --labels {input.labels} --images {input.images} "
        "--tables {params.tables} --dataset {wildcards.src} --fold {wildcards.fold} > {log} 2>&1"


rule train_sup:
    input:
        tables=lambda w: list(prepared(w.dataset).values()),
    output:
        "results/{dataset}/supervised/{model}/fold{fold}/checkpoint.pt",
    params:
        cfg=lambda w: meta_training_config("model", "datasets", labelled=True, dataset=w.dataset),
        method="sup",
        out=lambda w, output: os.path.dirname(output[0]),
        tables=lambda w, input: os.path.dirname(input.tables[0]),
    threads: TORCH_JOB_THREADS
    resources:
        gpu=gpus("training"),
    conda:
        CONDA_ENV
    log:
        "logs/{dataset}/supervised/{model}/fold{fold}.log",
    benchmark:
        "results/benchmarks/{dataset}/supervised/{model}/fold{fold}.tsv"
    shell:
        "umtfss train --config {params.cfg:q} --method {params.method:q} --out-dir {params.out} "
        "--tables {params.tables} --dataset {wildcards.dataset} --fold {wildcards.fold} > {log} 2>&1"


# the paper's Table 2 without unsupervised meta-training: sup on the labelled subset finetune-P% uses
use rule train_sup as train_sup_fraction with:
    output:
        "results/{dataset}/supervised/{model}/sup-{pct}%/fold{fold}/checkpoint.pt",
    params:  # merged into train_sup's
        method=lambda w: f"sup-{w.pct}%",
    log:
        "logs/{dataset}/supervised/{model}/sup-{pct}-fold{fold}.log",
    benchmark:
        "results/benchmarks/{dataset}/supervised/{model}/sup-{pct}-fold{fold}.tsv"


rule finetune:
    # the labelled images are the benchmark's ({dataset}), whatever the unlabeled source was
    input:
        init="results/{src}/{embedder}/clusters-{clusters}/models/{model}/unsup/checkpoint.pt",
        tables=lambda w: list(prepared(w.dataset).values()),
    output:
        "results/{src}/{embedder}/clusters-{clusters}/models/{model}/finetune-{pct}%/{dataset}/fold{fold}/checkpoint.pt",
    params:
        cfg=lambda w: meta_training_config("model", "datasets", finetune=True, dataset=w.dataset),
        out=lambda w, output: os.path.dirname(output[0]),
        tables=lambda w, input: os.path.dirname(input.tables[0]),
    threads: TORCH_JOB_THREADS
    resources:
        gpu=gpus("training"),
    conda:
        CONDA_ENV
    log:
        "logs/{src}/{embedder}/clusters-{clusters}/{model}/finetune-{pct}-{dataset}-fold{fold}.log",
    benchmark:
        "results/benchmarks/{src}/{embedder}/clusters-{clusters}/{model}/finetune-{pct}-{dataset}-fold{fold}.tsv"
    shell:
        "umtfss train --config {params.cfg:q} --method finetune-{wildcards.pct}% --out-dir {params.out} "
        "--init {input.init} --tables {params.tables} --dataset {wildcards.dataset} --fold {wildcards.fold} > {log} 2>&1"
