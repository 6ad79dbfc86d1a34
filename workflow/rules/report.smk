# Report: figures and tables for `snakemake --report report.html`


report: "../report/workflow.rst"


rule report:
    input:
        checkpoint=rules.train.output.checkpoint,
        meta=rules.encode.output.meta,
        val=rules.encode.output.val,
        tokenizer=rules.train_bpe.output.tokenizer,
        corpus_stats=rules.clean.output.stats,
        converted=rules.quantize.input.gguf,
        q4_k_m="exports/tinygpt/model-q4_k_m.gguf",
        evaluation=rules.evaluate.output.json,
        kl="reports/kl/model-q4_k_m.json",
        chat=rules.chat_eval.output.json,
        code=sources("report"),
    output:
        loss=report("reports/loss.svg", category="Training", caption="../report/loss.rst"),
        training=report("reports/training.html", category="Training", caption="../report/training.rst"),
        data=report("reports/data.html", category="Data", caption="../report/data.rst"),
        gguf=report("reports/gguf.html", category="GGUF files", caption="../report/gguf.rst"),
        timings=report("reports/timings.html", category="Timings", caption="../report/timings.rst"),
        chat=report("reports/chat.html", category="Chat", caption="../report/chat.rst"),
    params:
        runs=rules.train.params.runs,
        benchmarks="benchmarks",
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    threads: 1
    conda:
        "../envs/tinygpt.yaml"
    shell:
        "python -m tinygpt report --checkpoint {input.checkpoint} --runs_dir {params.runs} --data_dir $(dirname {input.meta})"
        " --tokenizer {input.tokenizer} --corpus_stats {input.corpus_stats} --gguf_dir $(dirname {input.q4_k_m})"
        " --evaluation {input.evaluation} --kl_dir $(dirname {input.kl}) --benchmarks {params.benchmarks} --skip report --loss_svg {output.loss} --training {output.training}"
        " --data {output.data} --gguf {output.gguf} --timings {output.timings} --chat {input.chat}"
        " --chat_page {output.chat} 2>&1 | tee {log}"
