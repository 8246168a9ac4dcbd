"""Stage evaluate: the meta-test protocol, one score table per benchmark."""


rule evaluate:
    input:
        evaluation_inputs,
    output:
        scores=report(
            "results/eval_{dataset}.csv",
            caption="../report/eval.rst",
            category="Scores",
        ),
        classes=report(
            "results/eval_{dataset}_classes.csv",
            caption="../report/eval_classes.rst",
            category="Scores",
        ),
    params:
        cfg=stage_config("evaluation", only={"model": REFERENCE_PREDICTOR_KEYS}),
        methods=evaluation_methods,
        tables=lambda w: os.path.dirname(prepared(w.dataset)["images"]),
        meta=f"--meta embedder={EMBEDDER} --meta clusters={CLUSTERS} --meta unlabeled={SRC}",
        kind=lambda w: kind(w.dataset),
    threads: TORCH_JOB_THREADS
    resources:
        gpu=gpus("evaluation"),
    conda:
        CONDA_ENV
    log:
        "logs/evaluate-{dataset}.log",
    benchmark:
        "results/benchmarks/evaluate-{dataset}.tsv"
    shell:
        "umtfss evaluate --config {params.cfg:q} --dataset {params.kind} --tables {params.tables} "
        "{params.methods} --out {output.scores} --classes-out {output.classes} {params.meta} --workers auto > {log} 2>&1"


rule score_table:
    # the paper layout of the score table (umtfss score-table): a row per method, mIoU per fold and mean
    input:
        "results/eval_{dataset}.csv",
    output:
        report("results/eval_{dataset}.md", caption="../report/eval_table.rst", category="Scores"),
    conda:
        CONDA_ENV
    log:
        "logs/score_table_{dataset}.log",
    shell:
        "umtfss score-table {input:q} --out {output:q} > {log} 2>&1"


rule examples:
    # a look at what the scores mean: the first test episodes of the first fold, each method's mask (umtfss examples)
    input:
        evaluation_inputs,
    output:
        report("results/eval_{dataset}_examples.png", caption="../report/examples.rst", category="Scores"),
    params:
        cfg=stage_config("evaluation", only={"model": REFERENCE_PREDICTOR_KEYS}),
        methods=evaluation_methods,
        tables=lambda w: os.path.dirname(prepared(w.dataset)["images"]),
        kind=lambda w: kind(w.dataset),
    threads: 2
    resources:
        gpu=gpus("evaluation"),
    conda:
        CONDA_ENV
    log:
        "logs/examples-{dataset}.log",
    shell:
        "umtfss examples --config {params.cfg:q} --dataset {params.kind} --tables {params.tables} "
        "{params.methods} --out {output} > {log} 2>&1"
