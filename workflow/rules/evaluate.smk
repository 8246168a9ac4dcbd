"""Stage evaluate: the meta-test protocol, one score table per benchmark."""


def evaluation_inputs(w):
    """Tables of the benchmark and the checkpoint of every trained method, for every fold."""
    return sorted(set(prepared(w.dataset).values()) | {path for _, path in trained_checkpoints(w)})


def evaluation_methods(w):
    args = []
    for method in config["evaluation"]["methods"]:
        ckpt = method_checkpoint(method)
        args.append(method if ckpt is None else f"{method}={ckpt.replace('{dataset}', w.dataset)}")
    return " ".join(f"--method '{a}'" for a in args)


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
        cfg=stage_config("evaluation", "model", "datasets"),
        methods=evaluation_methods,
        tables="results/{dataset}/prepare",
        workers=lambda w, threads: min(threads, os.cpu_count() or 1),
        meta=f"--meta embedder={EMBEDDER} --meta clusters={CLUSTERS} --meta unlabeled={SRC}",
    threads: TORCH_JOB_THREADS
    conda:
        CONDA_ENV
    log:
        "logs/evaluate-{dataset}.log",
    benchmark:
        "results/benchmarks/evaluate-{dataset}.tsv"
    shell:
        "umtfss evaluate --config {params.cfg:q} --dataset {wildcards.dataset} --tables {params.tables} "
        "{params.methods} --out {output.scores} --classes-out {output.classes} {params.meta} --workers {params.workers} > {log} 2>&1"
