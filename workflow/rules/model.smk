# Model: train -> samples


rule train:
    input:
        train=rules.encode.output.train,
        val=rules.encode.output.val,
        meta=rules.encode.output.meta,
        tokenizer=rules.train_bpe.output.tokenizer,
        start=start_files(config["train"]),
        code=sources("train"),
    output:
        # Only the final checkpoint is declared: the resumable state (last.pt) lives in a run folder under
        # checkpoints/runs/ that Snakemake never deletes, so Ctrl-C and the same command resume training.
        checkpoint="checkpoints/best.pt",
    params:
        launcher=train_launcher(config["train"]),
        args=train_flags(config["model"], config["train"]),
        runs="checkpoints/runs",
    log:
        "logs/train.log",
    benchmark:
        "benchmarks/train.tsv"
    threads: 4
    resources:
        **train_resources(config["train"]),
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "{params.launcher} --data_dir $(dirname {input.meta}) --tokenizer {input.tokenizer}"
        " --out {output.checkpoint} --runs_dir {params.runs} {params.args} --threads {threads} 2>&1 | tee {log}"


rule samples:
    input:
        checkpoint=rules.train.output.checkpoint,
        code=sources("sample"),
    output:
        text=report("reports/samples.txt", category="Samples", caption="../report/samples.rst"),
    params:
        args=flags(config["sample"], skip=("count", "seed")),
        n=config["sample"]["count"],
        seed=config["sample"]["seed"],
    log:
        "logs/samples.log",
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        # sample i uses seed + i - 1: sample.seed picks the set, and every sample differs
        "for i in $(seq 1 {params.n}); do"
        " echo \"--- sample $i ---\";"
        " python -m tinygpt sample --checkpoint {input.checkpoint} {params.args} --seed $(({params.seed} + i - 1));"
        " echo; done > {output.text} 2> {log}"


rule evaluate:
    input:
        checkpoint=rules.train.output.checkpoint,
        val=rules.encode.output.val,
        code=sources("evaluate"),
    output:
        json="reports/evaluation.json",
    log:
        "logs/evaluate.log",
    benchmark:
        "benchmarks/evaluate.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt evaluate --checkpoint {input.checkpoint} --tokens {input.val} --json {output.json}"
        " 2>&1 | tee {log}"
